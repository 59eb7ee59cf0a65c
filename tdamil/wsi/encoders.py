"""Patch encoders: a registry of pathology foundation models built with timm.

Every model is built with ``pretrained=False`` and gets its weights from a LOCAL file only
(``extraction.weights``), loaded strictly (every key must match) after its sha256 has been
computed and logged. There is no code path that downloads anything.

=============  ======  =====  ==========================================================
name           dim     input  architecture / output
=============  ======  =====  ==========================================================
uni            1024    224    ViT-L/16, CLS token (MahmoodLab/UNI)
uni2_h         1536    224    ViT-H/14 SwiGLU, 8 register tokens, CLS (MahmoodLab/UNI2-h)
virchow2       2560    224    ViT-H/14 SwiGLU, 4 registers; CLS + mean of patch tokens
hoptimus0      1536    224    ViT-g/14 4 registers, CLS, its own mean/std (bioptimus)
gigapath       1536    224    ViT-g/16 tile encoder, CLS (resize 256, centre crop 224)
resnet50_trunc 1024    224    ResNet-50 to layer3, average pooled (CLAM's baseline)
conch          512     448    only with the `conch` package installed (see below)
phikon_v2      1024    224    only with `transformers` installed (see below)
tiny           64      64     seeded random conv net, no weights: tests and demos only
=============  ======  =====  ==========================================================

The encoder takes uint8 RGB patches ``(B, 3, H, W)`` on its device and does its own resizing
and normalisation (:meth:`PatchEncoder.preprocess`), so the data loader only moves bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tdamil.atomic import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "EncoderSpec",
    "PatchEncoder",
    "EncoderError",
    "ENCODERS",
    "ENCODER_NAMES",
    "get_spec",
    "build_encoder",
    "load_encoder",
    "load_state_dict_file",
    "weights_digest",
    "TinyEncoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderError(ValueError):
    """An encoder cannot be built or its weights do not fit. The message says what to do."""


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder.

    name, dim:     registry name and output feature size.
    input_size:    side of the square image the network sees.
    resize_to:     patches are first resized to this side, then centre-cropped to
                   ``input_size`` (``None``: resized straight to ``input_size``).
    mean, std:     normalisation of [0, 1] RGB.
    build:         ``build(**overrides) -> nn.Module`` returning the backbone without weights;
                   overrides (e.g. ``depth=1``) exist for tests only.
    pool:          ``"pooled"`` (the backbone returns the embedding) or ``"cls_mean"``
                   (tokens -> CLS concatenated with the mean of the patch tokens).
    num_prefix_tokens: CLS + register tokens (for ``cls_mean``).
    ignore_keys:   key prefixes in a weights file that the model does not use (truncated nets).
    needs_weights: False only for the test encoder.
    source:        where the weights come from (for error messages and docs).
    """

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[..., nn.Module]
    resize_to: Optional[int] = None
    pool: str = "pooled"
    num_prefix_tokens: int = 1
    ignore_keys: tuple[str, ...] = ()
    needs_weights: bool = True
    source: str = ""
    requires: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------
def _timm(arch: str, **kwargs: Any) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, **{**kwargs, **overrides})

    return build


def _swiglu_kwargs() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def _build_uni2(**overrides: Any) -> nn.Module:
    kw = dict(
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
        mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
    )
    return _timm("vit_giant_patch14_224", **kw, **_swiglu_kwargs())(**overrides)


def _build_virchow2(**overrides: Any) -> nn.Module:
    kw = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
              dynamic_img_size=True, reg_tokens=4)
    return _timm("vit_huge_patch14_224", **kw, **_swiglu_kwargs())(**overrides)


class ResNet50Trunc(nn.Module):
    """ResNet-50 up to ``layer3`` (1024 channels), global average pooled (CLAM's baseline encoder).

    Accepts torchvision/timm ImageNet ResNet-50 state dicts; their ``layer4.*`` and ``fc.*``
    entries are not used (see ``EncoderSpec.ignore_keys``).
    """

    def __init__(self, **overrides: Any) -> None:
        super().__init__()
        import timm

        net = timm.create_model("resnet50", pretrained=False, num_classes=0, **overrides)
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


class TinyEncoder(nn.Module):
    """Small seeded conv net for tests and demos: deterministic features from pixels, no file.

    Two strided convolutions with weights drawn from ``torch.Generator().manual_seed(seed)``,
    ReLU, global average pooling, plus per-channel means (so colour matters). Not a pathology
    model: never use its features for real training.
    """

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        if dim < 4:
            raise EncoderError("the tiny encoder needs dim >= 4")
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 32, kernel_size=4, stride=4)
        self.conv2 = nn.Conv2d(32, dim - 3, kernel_size=4, stride=4)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / fan_in**0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return torch.cat([h.mean(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


def _build_conch(**overrides: Any) -> nn.Module:
    raise EncoderError(
        "CONCH is built by its own library: install MahmoodLab's `conch` package (not on PyPI; "
        "`pip install git+<CONCH repository>` on a machine with access) and use encoder 'conch' with "
        "extraction.weights pointing at its local pytorch_model.bin."
    )


def _build_phikon_v2(**overrides: Any) -> nn.Module:
    raise EncoderError("Phikon-v2 needs the weights folder (config.json); it is built in load_encoder.")


ENCODERS: dict[str, EncoderSpec] = {
    s.name: s
    for s in (
        EncoderSpec(
            "uni", 1024, 224, IMAGENET_MEAN, IMAGENET_STD,
            _timm("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                  dynamic_img_size=True),
            source="MahmoodLab/UNI pytorch_model.bin",
        ),
        EncoderSpec("uni2_h", 1536, 224, IMAGENET_MEAN, IMAGENET_STD, _build_uni2,
                    source="MahmoodLab/UNI2-h pytorch_model.bin"),
        EncoderSpec("virchow2", 2560, 224, IMAGENET_MEAN, IMAGENET_STD, _build_virchow2, pool="cls_mean",
                    num_prefix_tokens=5, source="paige-ai/Virchow2 pytorch_model.bin"),
        EncoderSpec(
            "hoptimus0", 1536, 224, HOPTIMUS_MEAN, HOPTIMUS_STD,
            _timm("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5, dynamic_img_size=False,
                  num_classes=0),
            source="bioptimus/H-optimus-0 pytorch_model.bin",
        ),
        EncoderSpec(
            "gigapath", 1536, 224, IMAGENET_MEAN, IMAGENET_STD,
            _timm("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                  num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
            resize_to=256, source="prov-gigapath/prov-gigapath pytorch_model.bin (tile encoder)",
        ),
        EncoderSpec("resnet50_trunc", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, ResNet50Trunc,
                    ignore_keys=("layer4.", "fc."), source="an ImageNet ResNet-50 state dict (torchvision or timm)"),
        EncoderSpec("conch", 512, 448, CLIP_MEAN, CLIP_STD, _build_conch, resize_to=448,
                    source="MahmoodLab/CONCH pytorch_model.bin", requires=("conch",)),
        EncoderSpec("phikon_v2", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, _build_phikon_v2,
                    source="owkin/phikon-v2 folder (config.json + model.safetensors)", requires=("transformers",)),
        EncoderSpec("tiny", 64, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), TinyEncoder, needs_weights=False,
                    source="none (seeded)"),
    )
}
ENCODER_NAMES = tuple(ENCODERS)


def get_spec(name: str) -> EncoderSpec:
    """The registered :class:`EncoderSpec` called ``name`` (case-insensitive, '-' = '_')."""
    key = name.lower().replace("-", "_")
    if key not in ENCODERS:
        raise EncoderError(f"unknown encoder '{name}'; choose one of: {', '.join(ENCODER_NAMES)}.")
    return ENCODERS[key]


# --------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------
class PatchEncoder(nn.Module):
    """uint8 RGB patches ``(B, 3, H, W)`` -> features ``(B, dim)``, with the model's own
    resizing and normalisation.

    spec:            the :class:`EncoderSpec`.
    backbone:        the network.
    weights_sha256:  sha256 of the weights file (``"none"`` for the tiny encoder).
    weights_path:    the file the weights came from, or ``None``.
    """

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, weights_sha256: str = "none",
                 weights_path: Optional[Path] = None, embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self._embed = embed
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 255] float) ``(B, 3, H, W)`` -> normalised float at ``input_size``."""
        x = images.float().div_(255.0)
        side = self.spec.resize_to or self.spec.input_size
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        if side != self.spec.input_size:
            off = (side - self.spec.input_size) // 2
            x = x[..., off: off + self.spec.input_size, off: off + self.spec.input_size]
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> features (no preprocessing)."""
        if self._embed is not None:
            return self._embed(x)
        out = self.backbone(x)
        if self.spec.pool == "cls_mean":
            cls = out[:, 0]
            patches = out[:, self.spec.num_prefix_tokens:]
            out = torch.cat([cls, patches.mean(dim=1)], dim=-1)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images))


def build_encoder(name: str, **overrides: Any) -> PatchEncoder:
    """The architecture of encoder ``name`` with freshly initialised weights (no file read).

    Used by tests (``overrides`` such as ``depth=1`` make a cheap copy of the same family) and
    by :func:`load_encoder`. Build under ``torch.device('meta')`` to check shapes for free.
    """
    spec = get_spec(name)
    return PatchEncoder(spec, spec.build(**overrides))


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` file (never pickled
    code: ``weights_only=True``). Unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and strips a
    ``module.`` prefix (DataParallel checkpoints).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise EncoderError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc}). Use the model's original "
            "pytorch_model.bin / model.safetensors file; re-copy it if it may be truncated."
        ) from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"{path}: does not hold a state dict (a mapping of names to tensors).")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _strict_load(module: nn.Module, sd: dict[str, torch.Tensor], spec: EncoderSpec, path: Path) -> None:
    if spec.ignore_keys:
        dropped = [k for k in sd if k.startswith(spec.ignore_keys)]
        sd = {k: v for k, v in sd.items() if not k.startswith(spec.ignore_keys)}
        if dropped:
            logger.info("%s: %d tensors not used by %s (%s...)", path.name, len(dropped), spec.name, ", ".join(spec.ignore_keys))
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})")
        raise EncoderError(
            f"{path}: these weights do not fit encoder '{spec.name}' ({'; '.join(parts)}). Check that "
            f"extraction.encoder matches the file (expected: {spec.source})."
        )
    # the module was built on the meta device: take the file's tensors as they are (no random
    # init, no second copy in memory), as float32 for floating-point entries
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise EncoderError(f"{path}: encoder '{spec.name}' has tensors not covered by the file: {', '.join(left[:3])}")


def load_encoder(name: str, weights: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu",
                 weights_sha256: Optional[str] = None, **overrides: Any) -> PatchEncoder:
    """Build encoder ``name`` and load its weights from the local file ``weights`` (strict).

    The file's sha256 is computed, logged and stored on the returned encoder
    (``weights_sha256``), and goes into every feature file it produces. Returns the encoder in
    eval mode on ``device``. Raises :class:`EncoderError` when the file is missing, unreadable
    or does not fit the architecture. ``weights_sha256`` skips re-hashing a file the caller
    has just hashed with :func:`weights_digest`.
    """
    spec = get_spec(name)
    if not spec.needs_weights:
        if weights is not None:
            logger.warning("encoder '%s' uses no weights file; ignoring %s", spec.name, weights)
        enc = PatchEncoder(spec, spec.build(**overrides))
        return enc.eval().to(device)
    if weights is None:
        raise EncoderError(
            f"encoder '{spec.name}' needs a local weights file: set extraction.weights in the site YAML to it "
            f"({spec.source}). Download it once on a machine with internet access (after accepting the model's "
            "licence) and copy it here; tdamil never downloads weights."
        )
    path = Path(weights)
    if not path.exists():
        raise EncoderError(
            f"{path}: weights file for encoder '{spec.name}' not found. Fix extraction.weights in the site YAML "
            f"(expected: {spec.source})."
        )
    for pkg in spec.requires:
        if importlib.util.find_spec(pkg) is None:
            raise EncoderError(
                f"encoder '{spec.name}' needs the Python package '{pkg}', which is not installed; install it "
                "into this environment or choose another encoder."
            )
    sha = weights_sha256 or weights_digest(path)
    logger.info("encoder %s: weights %s sha256 %s", spec.name, path, sha)
    if spec.name == "conch":
        backbone, embed = _load_conch(path)
        enc = PatchEncoder(spec, backbone, sha, path, embed=embed)
    elif spec.name == "phikon_v2":
        backbone = _load_phikon_v2(path, spec)
        enc = PatchEncoder(spec, backbone, sha, path, embed=lambda x: backbone(pixel_values=x).last_hidden_state[:, 0])
    else:
        sd = load_state_dict_file(path)
        with torch.device("meta"):
            backbone = spec.build(**overrides)
        _strict_load(backbone, sd, spec, path)
        enc = PatchEncoder(spec, backbone, sha, path)
    return enc.eval().to(device)


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of a weights file, or of a weights folder (names + file digests, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _load_conch(path: Path) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """CONCH through MahmoodLab's own library (not on PyPI), from a local checkpoint only."""
    from conch.open_clip_custom import create_model_from_pretrained  # type: ignore[import-not-found]

    if not path.is_file():
        raise EncoderError(f"{path}: CONCH expects its checkpoint file (pytorch_model.bin), not a folder.")
    model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(path))
    return model, lambda x: model.encode_image(x, proj_contrast=False, normalize=False)


def _load_phikon_v2(path: Path, spec: EncoderSpec) -> nn.Module:
    """Phikon-v2 (a DINOv2 ViT-L/16 in Hugging Face format) from a local folder, strict load."""
    from transformers import Dinov2Config, Dinov2Model  # type: ignore[import-not-found]

    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise EncoderError(f"{folder}: Phikon-v2 needs its config.json next to the weights; copy the whole model folder.")
    model = Dinov2Model(Dinov2Config.from_json_file(str(cfg_file)))
    weights = path if path.is_file() else next(
        (folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()), None
    )
    if weights is None:
        raise EncoderError(f"{folder}: no model.safetensors or pytorch_model.bin found for Phikon-v2.")
    _strict_load(model, load_state_dict_file(weights), spec, weights)
    return model
