"""``jaxdp data prepare``: build a TFDS dataset in ``data_dir`` once, so that training reads it offline.

The dataset is written by TFDS's own builder class for ``name`` (its features, splits, version and
array_record shards), so ``dataset=NAME data_dir=D`` reads it through the normal TFDS reader
(``tfds.data_source``: random access). Two ways in:

* **From TFDS's download** (a machine with a network): TFDS fetches the files and checks them against
  the checksums it records for ``name``.
* **From local files** (``source=DIR``; no network): the original files of ``mnist``,
  ``fashion_mnist`` or ``kmnist`` (IDX, gzipped or not) are read from ``DIR``, e.g. Debian's
  ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``). Each file must match
  TFDS's recorded checksum of the download, or, for a re-compressed copy, the checksum of its
  uncompressed content recorded below; ``verify=False`` takes your own IDX files after the
  structural checks only.

The MNIST family's TFDS builder reads its files, and encodes its images, with TensorFlow; jaxdp does
not depend on TensorFlow, so the same records are read here with numpy and the images PNG-encoded
through PIL (``_mnist_examples``). Everything else (features, split names and sizes, keys, shuffling,
shards, ``dataset_info.json``) is TFDS's builder's own. ``tests/test_prepare.py`` checks the round trip
and the split sizes against TFDS's builder.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import shutil

import numpy as np

__all__ = ["LOCAL_SOURCES", "prepare"]

# Datasets whose original files can be read from a local folder: TFDS's MNIST builder and its
# subclasses, all four IDX files (train/t10k images and labels).
LOCAL_SOURCES = ("mnist", "fashion_mnist", "kmnist")

# sha256 of the *uncompressed* IDX files, for copies whose gzip container differs from TFDS's download
# (Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 re-compressed the files (its
# gzip headers carry no file name and a 2020 time stamp, so the .gz checksums differ from TFDS's). Measured with
# `gzip -dc FILE | sha256sum` on that package's files.
CONTENT_SHA256 = {
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

_IDX_MAGIC = {3: 2051, 1: 2049}  # rank of the array -> IDX magic number (unsigned byte data)


class PrepareError(ValueError):
    """A source file that is missing or not what the dataset expects (one line, naming the file)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_idx(path: str, rank: int, count: int, what: str) -> np.ndarray:
    """The uint8 array of an uncompressed IDX file, after checking its header against what TFDS expects."""
    with open(path, "rb") as f:
        header = f.read(4 + 4 * rank)
        magic = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
        dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
        if magic != _IDX_MAGIC[rank] or len(header) < 4 + 4 * rank:
            raise PrepareError(
                f"{what} is not an IDX file of {rank}-d unsigned bytes (magic number {magic}, expected "
                f"{_IDX_MAGIC[rank]}); is it the right file?"
            )
        if dims[0] != count or (rank == 3 and dims[1:] != [28, 28]):
            raise PrepareError(
                f"{what} holds {dims[0]} {'28x28 images' if rank == 3 else 'labels'} of shape {dims[1:]}; the "
                f"split has {count} of shape {[28, 28] if rank == 3 else []}: is it the right file?"
            )
        data = np.frombuffer(f.read(), np.uint8)
    if data.size != int(np.prod(dims)):
        raise PrepareError(f"{what} is truncated: {data.size} bytes of data, its header says {int(np.prod(dims))}.")
    return data.reshape(dims)


def _mnist_examples(self, num_examples, data_path, label_path):
    """TFDS's MNIST ``_generate_examples`` without TensorFlow: the IDX files are read with numpy, and each image
    goes to TFDS as a PIL image, which TFDS PNG-encodes with PIL (its numpy path needs TensorFlow's encoder).
    PNG is lossless: the arrays read back are the IDX bytes exactly; the PNG bytes may differ from TF's."""
    from PIL import Image

    images = _read_idx(data_path, 3, num_examples, os.path.basename(data_path))
    labels = _read_idx(label_path, 1, num_examples, os.path.basename(label_path)).astype(np.int64)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield index, {"image": Image.fromarray(image, mode="L"), "label": label}


class _LocalFiles:
    """Stands in for TFDS's download manager: each URL the builder asks for is the file of the same name in
    ``source`` (gzipped or not), checked, then uncompressed into ``work``."""

    def __init__(self, name: str, source: str, work: str, url_infos: dict, verify: bool):
        self.name, self.source, self.work, self.url_infos, self.verify = name, source, work, url_infos, verify
        self.downloaded_size = 0

    def _one(self, url: str) -> str:
        fname = url.rsplit("/", 1)[-1]
        plain = fname[:-3] if fname.endswith(".gz") else fname
        candidates = [os.path.join(self.source, f) for f in (fname, plain)]
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            raise PrepareError(
                f"{self.name}: expected {candidates[0]} (or uncompressed {candidates[1]}), one of the dataset's "
                f"original files; for {self.name!r} from Debian install dataset-{self.name.replace('_', '-')} and "
                "pass --source with the folder `dpkg -L` lists."
            )
        self.downloaded_size += os.path.getsize(found)
        info = self.url_infos.get(url)
        verified = info is not None and found.endswith(".gz") and _sha256(found) == info.checksum
        out = os.path.join(self.work, plain)
        if found.endswith(".gz"):
            try:
                with gzip.open(found, "rb") as f, open(out, "wb") as g:
                    shutil.copyfileobj(f, g, 1 << 20)
            except (OSError, EOFError) as e:
                raise PrepareError(f"{found} is not a readable gzip file ({e}); is it the right file?") from None
        else:
            shutil.copyfile(found, out)
        if self.verify and not verified:
            known = CONTENT_SHA256.get(self.name, {}).get(plain)
            digest = _sha256(out)
            if digest != known:
                raise PrepareError(
                    f"{found} has sha256 {digest}: neither TFDS's recorded checksum of {url} nor a known "
                    f"copy of {self.name}'s {plain}; pass --no_verify to use your own files anyway."
                )
        return out

    def download_and_extract(self, urls):
        return {k: self._one(u) for k, u in urls.items()} if isinstance(urls, dict) else self._one(urls)


def _builder_class(name: str, source: str | None, work: str, verify: bool):
    import tensorflow_datasets as tfds
    from etils import epath

    parent = tfds.builder_cls(name)
    if name not in LOCAL_SOURCES:
        if source is not None:
            raise PrepareError(
                f"--source reads the original files of {', '.join(LOCAL_SOURCES)} only; prepare {name!r} without "
                "--source on a machine with a network, then copy its data_dir here."
            )
        return parent

    class Prepared(parent, skip_registration=True):
        """``parent`` (TFDS's builder for ``name``), reading its files with numpy, from ``source`` if given."""

        _generate_examples = _mnist_examples

        def _make_download_manager(self, download_dir, download_config):
            if source is None:
                return super()._make_download_manager(download_dir, download_config)
            return _LocalFiles(name, source, work, self.url_infos or {}, verify)

    Prepared.name = parent.name
    # TFDS finds its recorded checksums from the builder's code path (its own lookup of that path needs the
    # optional importlib_resources, so it is given here).
    Prepared.code_path = epath.Path(inspect.getfile(parent))
    Prepared.__module__ = parent.__module__
    return Prepared


def recorded_checksums(name: str) -> dict:
    """TFDS's recorded ``{url: UrlInfo(size, checksum, filename)}`` of ``name``'s download (what its download
    manager verifies)."""
    return dict(_builder_class(name, None, "", True).url_infos or {})


def prepare(name: str, data_dir: str, source: str | None = None, verify: bool = True) -> str:
    """Build TFDS dataset ``name`` (array_record) in ``data_dir``; returns the folder written.

    Args:
      name: a TFDS dataset name; with ``source``, one of :data:`LOCAL_SOURCES`.
      data_dir: the TFDS data directory that training then reads (``data_dir=`` in a config).
      source: a folder with the dataset's original files; without it TFDS downloads them.
      verify: check each local file against a known checksum (TFDS's, or :data:`CONTENT_SHA256`).

    Raises:
      PrepareError: a missing or wrong source file, named (one line).
    """
    import tensorflow_datasets as tfds

    if source is not None and not os.path.isdir(source):
        raise PrepareError(f"--source {source!r} is not a folder; pass the folder that holds {name}'s files.")
    os.makedirs(data_dir, exist_ok=True)
    work = os.path.join(data_dir, "downloads", "jaxdp_local", name)
    os.makedirs(work, exist_ok=True)
    try:
        cls = _builder_class(name, source, work, verify)
        builder = cls(data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for empty in (os.path.dirname(work), os.path.join(data_dir, "downloads")):
            if os.path.isdir(empty) and not os.listdir(empty):
                os.rmdir(empty)
    return os.fspath(builder.data_path)
