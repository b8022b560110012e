"""Shared fixtures: a real storage emulator, a Storage, fresh buckets, small image folders.

Storage is never mocked: ``emulator`` is fake-gcs-server on 127.0.0.1 (one
per test session, in memory; it enforces generation preconditions like GCS) and ``storage`` is
the real google-cloud-storage client pointed at it through ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import random
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

from skin.infra.emulator import Emulator
from skin.infra.storage import Storage

# The real images, when this checkout sits beside ../shared (see docs/TEAM.md).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared/datasets/skin-cancer-isic/train"
CLASSES = ("benign", "malignant")
IMAGES_PER_CLASS = 40


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    random.seed(1234)
    np.random.seed(1234)


@pytest.fixture(scope="session")
def emulator():
    """A running storage emulator; ``STORAGE_EMULATOR_HOST`` points at it for the session."""
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    with Emulator() as emu:
        os.environ.update(emu.environ())
        try:
            yield emu
        finally:
            if old is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture
def storage(emulator) -> Storage:
    """A Storage talking to the session's emulator (gs://) or the local disk."""
    return Storage()


@pytest.fixture
def bucket(emulator) -> str:
    """A fresh, empty bucket name, created in the emulator for this test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(name)
    return name


def _numbered(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: (int(p.stem) if p.stem.isdigit() else 10**9, p.name))


@pytest.fixture(scope="session")
def real_or_synthetic_images(tmp_path_factory) -> Path:
    """A small labelled folder (``benign/``, ``malignant/``, ~40 images each).

    Real ISIC images (symlinked, spread evenly over each class's numbering)
    when ``SHARED_DATA`` exists, otherwise generated with :mod:`skin.data.synthetic`.
    Treat it as read-only; copy it to change it.
    """
    out = tmp_path_factory.mktemp("images")
    if SHARED_DATA.is_dir():
        for label in CLASSES:
            files = _numbered(list((SHARED_DATA / label).glob("*.jpg")))
            step = max(1, len(files) // IMAGES_PER_CLASS)
            (out / label).mkdir()
            for src in files[::step][:IMAGES_PER_CLASS]:
                (out / label / src.name).symlink_to(src)
        return out
    from skin.data import synthetic

    return synthetic.generate(out, IMAGES_PER_CLASS, size=96, seed=0)


@pytest.fixture
def image_folder(real_or_synthetic_images, tmp_path) -> Path:
    """A private, writable copy of ``real_or_synthetic_images`` (symlinks stay symlinks)."""
    dst = tmp_path / "source"
    shutil.copytree(real_or_synthetic_images, dst, symlinks=True)
    return dst
