"""Weights files by their bytes: the libraries' cached pretrained files (fingerprinted by
their own sha256) and sha256-pinned reads of weights URIs, cached once per machine."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from fadrm import storage
from fadrm.models.create import _resolve, _tv_weights
from fadrm.models.weights import WeightsError


@dataclass(frozen=True)
class PretrainedFile:
    """Where a named model's pretrained weights come from and where they are cached."""

    name: str
    url: str
    """What the library would download (a URL or a Hugging Face Hub file)."""
    path: str
    """The local file the library reads instead of downloading, once it is there."""

    @property
    def cached(self) -> bool:
        import os

        return os.path.isfile(self.path)


def pretrained_file(name: str) -> PretrainedFile | None:
    """The file ``create_model(name, pretrained=True)`` reads, or None where the source
    names no single file (a built-in model has no pretrained weights at all)."""
    src, bare = _resolve(name)
    hub_checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    if src == "torchvision":
        url = _tv_weights(bare).url
        return PretrainedFile(name, url, os.path.join(hub_checkpoints, os.path.basename(url)))
    if src != "timm":
        return None
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(bare)
    if pcfg is None:
        return None
    if pcfg.file:
        return PretrainedFile(name, pcfg.file, pcfg.file)
    if pcfg.hf_hub_id:
        try:
            import huggingface_hub
        except ImportError:
            huggingface_hub = None
        if huggingface_hub is not None:
            # timm prefers the Hub: safetensors first, then the pickled file.
            for filename in ("model.safetensors", "pytorch_model.bin"):
                hit = huggingface_hub.try_to_load_from_cache(pcfg.hf_hub_id, filename)
                if isinstance(hit, str):
                    return PretrainedFile(name, f"hf://{pcfg.hf_hub_id}/{filename}", hit)
            from huggingface_hub import constants

            path = os.path.join(constants.HF_HUB_CACHE,
                                "models--" + pcfg.hf_hub_id.replace("/", "--"))
            return PretrainedFile(name, f"hf://{pcfg.hf_hub_id}/model.safetensors", path)
    if pcfg.url:
        return PretrainedFile(name, pcfg.url,
                              os.path.join(hub_checkpoints, os.path.basename(pcfg.url)))
    return None


_HUB_HASH = re.compile(r"-([0-9a-f]{8,})\.pth$")


def pretrained_fingerprint(name: str) -> str:
    """The fingerprint of ``name``'s pretrained weights: the cached file's own sha256, so a
    library upgrade (or a replaced file) that changes the weights changes every stage key
    that used them; the bare name only where the file is not on this machine (preflight
    refuses to run such a config)."""
    try:
        source = pretrained_file(name)
    except Exception:  # noqa: BLE001 - no pretrained config: preflight names the problem
        source = None
    if source is None or not source.cached:
        return f"pretrained:{name}"
    digest = storage.file_sha256(source.path)
    pinned = _HUB_HASH.search(os.path.basename(source.url))
    if pinned and not digest.startswith(pinned.group(1)):
        # torch hub's convention: the file name carries its sha256's first hex digits.
        raise WeightsError(f"{source.path}: sha256 {digest[:12]}... does not start with "
                           f"{pinned.group(1)}, the hash its name pins ({source.url}); the "
                           f"file is damaged or not {name}'s weights: fetch it again")
    return f"pretrained:{name}:sha256:{digest}"


def weights_cache_dir() -> str:
    """Where downloaded (https://) weights are kept, by sha256: $FADRM_CACHE/weights, else
    ~/.cache/fadrm/weights."""
    import os

    root = os.environ.get("FADRM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "fadrm")
    return os.path.join(root, "weights")


def read_pinned(uri: str, sha256: str | None, key: str = "weights") -> bytes:
    """The bytes of a weights file, checked against its ``sha256`` pin when there is one.

    URLs are downloaded once per machine into :func:`weights_cache_dir` (named by the pin)
    and read from there afterwards. A mismatch is a :class:`WeightsError` naming both
    digests; nothing mismatched is ever cached or loaded.
    """
    import os

    cached = os.path.join(weights_cache_dir(), f"{sha256}.pt") if sha256 else None
    if cached and storage.is_url(uri) and os.path.isfile(cached):
        data = open(cached, "rb").read()
        if storage.sha256_bytes(data) == sha256:
            return data
    data = storage.read_bytes(uri)
    digest = storage.sha256_bytes(data)
    if sha256 and digest != sha256:
        raise WeightsError(f"{key}: {uri} has sha256 {digest[:16]}... but its pin "
                           f"(sha256 in the config) is {sha256[:16]}...: the file changed, or "
                           f"the pin is wrong; nothing was loaded")
    if cached and storage.is_url(uri):
        storage.write_bytes_atomic(cached, data)
    return data
