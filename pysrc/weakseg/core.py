"""The core interfaces: registries, method configs, the Segmenter protocol and
``weakseg.create``.

Methods, backbones and proposers register by name::

    @METHODS.register("moduseg", config=ModuSegConfig)
    class ModuSeg(Segmenter): ...

``create(name, **overrides)`` builds the method's config dataclass (defaults,
then a TOML/YAML/JSON file if ``config_file`` is given, then keyword
overrides, then ``--set key=value`` strings from the CLI) and instantiates it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Iterable, Protocol, Sequence, TypeVar, runtime_checkable

import torch

T = TypeVar("T")

IGNORE_INDEX = 255


class Registry(Generic[T]):
    """A name -> factory table with helpful errors.

    Entries are added by decorating the factory (``@REG.register("name")``) in the module that defines it.
    A module that the registry's users never import themselves is *declared* (``REG.declare("name",
    "package.module")``): the first lookup of ``name`` imports that module, whose decorator then fills the
    entry. The package entry point (``weakseg/__init__.py``) declares the built-in methods, toy recipes,
    trainers, commands and model sources this way, so no layer imports the layers above it to fill a table.
    Third-party packages add entries through the ``weakseg.<kind>s`` entry-point group (same resolution).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._configs: dict[str, type] = {}
        self._declared: dict[str, str] = {}
        self._entry_points_read = False

    def register(self, name: str, config: type | None = None) -> Callable[[T], T]:
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            if config is not None:
                self._configs[name] = config
            return obj

        return deco

    def declare(self, name: str, module: str) -> None:
        """``name`` is registered by importing ``module`` (done on the first lookup of ``name``)."""
        if not name or not isinstance(name, str) or not isinstance(module, str) or not module:
            raise ValueError(f"{self.kind} declarations need a name and a module path, got {name!r}, {module!r}")
        self._declared.setdefault(name, module)

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        from importlib.metadata import entry_points

        try:
            eps = entry_points(group=f"weakseg.{self.kind.replace(' ', '_')}s")
        except Exception:  # broken metadata of an unrelated distribution
            return
        for ep in eps:
            self.declare(ep.name, ep.value.split(":", 1)[0])

    def _resolve(self, name: str) -> None:
        if name in self._items:
            return
        self._read_entry_points()
        module = self._declared.get(name)
        if module is None:
            return
        import importlib

        importlib.import_module(module)
        if name not in self._items:
            raise KeyError(f"{self.kind} {name!r}: importing {module} (which declares it) did not register it")

    def get(self, name: str) -> T:
        self._resolve(name)
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none registered yet"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def config_class(self, name: str) -> type | None:
        self.get(name)
        return self._configs.get(name)

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted(set(self._items) | set(self._declared))

    def load_all(self) -> dict[str, T]:
        """Every entry, declared ones imported: name -> factory."""
        return {name: self.get(name) for name in self.names()}

    def __contains__(self, name: str) -> bool:
        self._read_entry_points()
        return name in self._items or name in self._declared

    def __len__(self) -> int:
        return len(self.names())


# ---- model specs: how every backbone and proposer is named ------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec, the one spelling of "which weights" for every backbone and proposer.

    ======================  =========  ========================================================================
    spec                    kind       meaning
    ======================  =========  ========================================================================
    ``tiny``                tiny       the family's tiny random model (tests); ``tiny:<variant>`` names a
                                       variant the family documents (e.g. ``tiny:sd15``)
    ``<source>[:<name>]``   <source>   weights from a registered model source (:data:`MODEL_SOURCES`, e.g.
                                       ``toy``: the toy world's committed weights)
    ``random:<model>``      random     the real architecture of ``<model>`` with random weights, no download
    an existing path        path       a local directory / file (``save_pretrained`` layout)
    anything else           hub        a hub name (Hugging Face / open_clip), loaded through the hub
    ======================  =========  ========================================================================
    """

    kind: str
    name: str | None = None
    raw: str = ""

    @classmethod
    def parse(cls, spec: "str | ModelSpec | Path", what: str = "model") -> "ModelSpec":
        if isinstance(spec, ModelSpec):
            return spec
        if isinstance(spec, Path):
            spec = str(spec)
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"{what}: expected a model spec (tiny, toy, random:<model>, a hub name or a local "
                             f"path), got {spec!r}")
        spec = spec.strip()
        head, sep, tail = spec.partition(":")
        if Path(spec).expanduser().exists() or spec.startswith(("/", "./", "../", "~")):
            return cls("path", str(Path(spec).expanduser()), spec)
        if head == "tiny":
            return cls("tiny", tail or None, spec)
        if head == "random":
            if not tail:
                raise ValueError(f"{what}: random:<model> needs the model whose architecture to build, "
                                 f"e.g. random:stabilityai/stable-diffusion-2-1-base")
            return cls("random", tail, spec)
        if head in MODEL_SOURCES and (not sep or tail):
            return cls(head, tail or None, spec)
        return cls("hub", spec, spec)

    def source_path(self, family: str) -> Path:
        """The local weights a model source (``toy``) holds for ``family``."""
        return Path(MODEL_SOURCES.get(self.kind)(family, self.name))


class ModelRegistry(Registry[T]):
    """A registry of model families (backbones, proposers) built from a :class:`ModelSpec`:
    ``BACKBONES.build("stable-diffusion", "toy", device="cpu")`` calls the family's ``from_spec``."""

    def build(self, family: str, spec: "str | ModelSpec | None", **options: Any):
        """The ``family`` model named by ``spec`` (None: the family's default), built with ``options``."""
        cls = self.get(family)
        if spec is not None:
            spec = ModelSpec.parse(spec, what=f"{self.kind} {family!r}")
        return cls.from_spec(spec, **options)


class FromSpec:
    """The one ``from_spec`` of a model family (a backbone or proposer class registered in
    :data:`BACKBONES` / :data:`PROPOSERS`): ``tiny`` goes to the class's ``_tiny(variant, **options)``,
    a model source (``toy``) and a local path to ``from_pretrained(<local path>, **options)``, a hub name to
    ``from_pretrained(<name>, **options)``, ``random:<model>`` to ``from_config(<model>, **options)``.
    Model sources hold float32-ready weights: they load as float32 unless ``dtype`` is given."""

    FAMILY: ClassVar[str] = ""
    #: the spec used when a method names none (``None``)
    DEFAULT_SPEC: ClassVar[str | None] = None

    @classmethod
    def from_spec(cls, spec: "str | ModelSpec | None", **options: Any):
        if spec is None:
            if cls.DEFAULT_SPEC is None:
                raise ValueError(f"{cls.FAMILY}: a model spec is required (tiny, a hub name or a local path)")
            spec = cls.DEFAULT_SPEC
        spec = ModelSpec.parse(spec, what=cls.FAMILY or cls.__name__)
        if spec.kind == "tiny":
            return cls._tiny(spec.name, **options)
        if spec.kind == "random":
            from_config = getattr(cls, "from_config", None)
            if from_config is None:
                raise ValueError(f"{cls.FAMILY}: random:<model> (real architecture, random weights) is not "
                                 f"available for this backbone; use tiny, a hub name or a local path")
            return from_config(spec.name, **options)
        if spec.kind in ("hub", "path"):
            return cls.from_pretrained(spec.name, **options)
        if options.get("dtype") is None:
            options["dtype"] = torch.float32
        return cls.from_pretrained(str(spec.source_path(cls.FAMILY)), **options)

    @classmethod
    def _tiny(cls, variant: str | None, **options: Any):
        if variant is not None:
            raise ValueError(f"{cls.FAMILY}: no tiny variant {variant!r}; use tiny")
        return cls.tiny(**options)


METHODS: Registry[type] = Registry("method")
BACKBONES: ModelRegistry[Callable] = ModelRegistry("backbone")
PROPOSERS: ModelRegistry[Callable] = ModelRegistry("proposer")
#: model sources by spec prefix: name -> ``fn(family, name) -> local path`` (``toy`` comes from weakseg.toy)
MODEL_SOURCES: Registry[Callable[[str, "str | None"], Path]] = Registry("model source")
#: how ``weakseg demo`` runs a method on the toy world: method name -> ``fn(work_dir, progress) -> DemoEntry``
TOY_DEMOS: Registry[Callable] = Registry("toy demo")
#: training loops by method name: ``fn(args: argparse.Namespace) -> int`` behind ``weakseg train <method>``,
#: plus ``add_arguments(parser)`` on the function
TRAINERS: Registry[Callable] = Registry("trainer")
#: extra CLI command groups: name -> ``add_parser(subparsers)`` that adds ``weakseg <name> ...``
COMMANDS: Registry[Callable] = Registry("command")
#: evaluation datasets that need no root (generated): name -> ``fn(split, **kwargs) -> dataset``
GENERATED_DATASETS: Registry[Callable] = Registry("generated dataset")


class HubUnavailableError(OSError):
    """A hub model cannot be loaded: no network, offline mode without a cached copy, or a failed download
    (raised by weakseg.backbones.hub; defined here so that :func:`create` can name the setting behind it)."""


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses add their own fields with defaults."""

    device: str = "cpu"
    seed: int = 0

    # --- construction from overrides, files and CLI strings -----------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **values: Any) -> "MethodConfig":
        merged = dataclasses.asdict(self)
        merged.update(values)
        return type(self).from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



@dataclass
class PresetConfig(MethodConfig):
    """A method config with named presets (``PRESETS``: preset name -> field values). Through
    ``from_dict`` / ``from_preset`` / ``weakseg.create`` a preset fills exactly the fields not named; by
    direct construction (``Config(preset=...)``) it fills the fields left at their defaults. Subclasses
    call :meth:`_apply_preset` first thing in ``__post_init__``."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    preset: str | None = None

    @classmethod
    def _check_preset(cls, preset: str) -> None:
        if preset not in cls.PRESETS:
            raise ValueError(f"{cls.__name__}.preset: unknown preset {preset!r}; known: {', '.join(cls.PRESETS)}")

    def _apply_preset(self) -> None:
        if self.preset is None:
            return
        self._check_preset(self.preset)
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                    for f in fields(self)}
        for k, v in self.PRESETS[self.preset].items():
            if getattr(self, k) == defaults[k]:
                setattr(self, k, tuple(v) if isinstance(v, list) else v)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PresetConfig":
        """Preset values (if ``values["preset"]`` names one), then every other value given."""
        values = dict(values)
        preset = values.pop("preset", None)
        if preset is not None:
            cls._check_preset(preset)
        cfg = super().from_dict({**(cls.PRESETS[preset] if preset else {}), **values})
        cfg.preset = preset  # recorded after construction: the explicit values already won
        return cfg

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PresetConfig":
        """The preset ``name`` with ``overrides`` on top."""
        return cls.from_dict({"preset": name, **overrides})


def read_safetensors(path: str | Path, what: str, hint: str = "", error: type[Exception] = ValueError
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The one place weakseg opens a safetensors file it wrote: -> (every tensor, the raw string metadata).
    Errors name ``what`` (the argument or kind of file the path came from): FileNotFoundError for a missing
    file (with ``hint``, e.g. the command that makes one), ``error`` (a ValueError subclass, e.g. a
    method's own file error) for a file safetensors cannot read (corrupt header, truncation)."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        raise error(f"{what}: {str(p)!r} is a directory; expected a safetensors file")
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(p)!r}" + (f"; {hint}" if hint else ""))
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers / truncation
        raise error(f"{what}: {str(p)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return tensors, meta


def read_safetensors_file(path: str | Path, formats: Sequence[str], what: str, hint: str = ""
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`read_safetensors` for files with a ``format`` entry and JSON-encoded metadata (trained heads,
    training checkpoints): -> (tensors, decoded metadata without ``format``). ValueError when the
    ``format`` is not one of ``formats``."""
    tensors, meta = read_safetensors(path, what, hint)
    if meta.get("format") not in formats:
        raise ValueError(f"{what}: {str(path)!r} has format {meta.get('format')!r}, expected "
                         f"{' or '.join(repr(f) for f in formats)}")
    try:
        return tensors, {k: json.loads(v) for k, v in meta.items() if k != "format"}
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {str(path)!r} has malformed metadata (not JSON: {e})") from None


class WeightsFileError(ValueError):
    """A trained-weights file (a head, a training checkpoint) whose tensors do not fit the model that loads
    them: missing, extra or renamed tensors, a wrong shape or dtype, NaN / Inf values."""


def _names(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_weights(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str | Path, what: str,
                  hint: str = "") -> dict[str, torch.Tensor]:
    """The one check of trained weights read from ``path`` (the argument ``what``) against ``expected`` (name ->
    a tensor of the wanted shape and dtype, e.g. ``module.state_dict()``): the same names, the same shape and
    dtype for each, finite values in every floating-point tensor. Returns ``tensors``; raises
    :class:`WeightsFileError` (one line naming the file and what is wrong, then ``hint``) otherwise."""

    def fail(problem: str):
        raise WeightsFileError(f"{what}: {str(path)!r} {problem}" + (f"; {hint}" if hint else ""))

    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        fail(", ".join(([f"lacks tensor(s) {_names(missing)}"] if missing else []) +
                       ([f"has unexpected tensor(s) {_names(extra)}"] if extra else [])) +
             " (renamed, missing or extra entries: not a file written for this model)")
    for name in sorted(expected):
        t, want = tensors[name], expected[name]
        if t.dtype != want.dtype:
            fail(f"tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}, expected "
                 f"{str(want.dtype).replace('torch.', '')}")
        if t.shape != want.shape:
            fail(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            fail(f"tensor {name!r} holds NaN or Inf values (a diverged run or a corrupt file)")
    return tensors


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file of config values (a mapping at the top level). Every error names the
    file: missing, a directory, unreadable, malformed, or not a mapping."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"config file {p}: is a directory, expected a .toml, .yaml, .yml or .json file")
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {p}: expected .toml, .yaml, .yml or .json, got {suffix or 'no suffix'}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ImportError(f"reading {p} on Python 3.10 needs tomli (pip install tomli)") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p}: malformed TOML ({_one_line(e)})") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {p} needs PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p}: malformed YAML ({_one_line(e)})") from None
        data = {} if data is None else data
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {p}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a mapping of option names to values at the top level, got "
                         f"{type(data).__name__}")
    return data


# ---- value types of config fields (user input from files and --set is checked against them) -----------------
def _field_types(config_cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a config dataclass (unresolvable annotations are left out)."""
    import typing

    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation that cannot be evaluated: fall back to per-field resolution below
        hints = {}
    return {f.name: hints[f.name] for f in fields(config_cls) if f.name in hints}


def _type_name(tp: Any) -> str:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Union or (origin is not None and type(tp).__name__ == "UnionType"):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp in (tuple, list) or origin in (tuple, list) or getattr(origin, "__name__", "") == "Sequence":
        return "a list"
    if origin is dict or getattr(origin, "__name__", "") == "Mapping":
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def is_int(value: Any, minimum: int | None = None) -> bool:
    """Whether ``value`` is an int (a bool, which Python counts as one, is not) and, given ``minimum``, at least
    that: the check behind the configs' and ops' "expected an int >= N" errors."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (a JSON / YAML / TOML value) fits the annotation ``tp``; annotations it does not know
    are accepted (the config's own checks decide)."""
    import collections.abc
    import typing

    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and type(tp).__name__ == "UnionType"):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return isinstance(value, dict)
    return True


def check_option_types(values: dict[str, Any], config_cls: type, source: str) -> dict[str, Any]:
    """Check user-given option values (from ``source``: a config file, ``--set``) against the field types of
    ``config_cls``: a ValueError names the option, the expected type and the value given. A bool is not an
    int. Strings that spell a number are accepted for float fields (YAML 1.1 reads ``1e-3`` as a string).
    Returns the (possibly converted) values."""
    types = _field_types(config_cls)
    out = dict(values)
    for key, value in values.items():
        tp = types.get(key)
        if tp is None or _matches(value, tp):
            continue
        if isinstance(value, str) and _matches(0.5, tp):
            try:
                out[key] = float(value)
                continue
            except ValueError:
                pass
        raise ValueError(f"{source}: option {key!r} expects {_type_name(tp)}, got {value!r} "
                         f"({type(value).__name__})")
    return out


def parse_set_options(items: Iterable[str], config_cls: type | None = None) -> dict[str, Any]:
    """Turn CLI ``key=value`` strings into typed values (JSON literals, else strings). With ``config_cls``,
    a value is kept as the raw string where the field takes a string and the JSON reading does not fit
    (``bank=2024``), and a value of the wrong type is refused naming the key (``steps=true`` for an int)."""
    out: dict[str, Any] = {}
    types = _field_types(config_cls) if config_cls is not None else {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        tp = types.get(key)
        if tp is not None and not _matches(value, tp) and _matches(raw, tp):
            value = raw
        if tp is not None and not _matches(value, tp):
            raise ValueError(f"--set {item}: option {key!r} expects {_type_name(tp)}, got {value!r} "
                             f"({type(value).__name__})")
        out[key] = value
    return out


def check_device(device: Any, what: str = "device") -> torch.device:
    """``device`` as a torch.device, or a ValueError naming ``what`` for an unknown device string and for a
    CUDA (or MPS) device this machine does not have."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what}: unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={device!r}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             f"False; torch CUDA {torch.version.cuda or 'not built'}); use device=cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{what}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{what}={device!r}: MPS is not available here; use device=cpu")
    elif d.type != "cpu":
        raise ValueError(f"{what}: unsupported device {device!r}; expected cpu, cuda or cuda:N")
    return d


@dataclass
class SegmentationOutput:
    """What every Segmenter returns.

    scores: (B, C, H, W) float per-class score maps at image resolution.
    labels: (B, H, W) int64 label map; 255 marks ignored pixels.
    class_names: the C names the channels of ``scores`` stand for.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.scores.dim() != 4 or self.labels.dim() != 3:
            raise ValueError(f"SegmentationOutput: expected scores (B, C, H, W) and labels (B, H, W), "
                             f"got {tuple(self.scores.shape)} and {tuple(self.labels.shape)}")
        if self.scores.shape[0] != self.labels.shape[0] or self.scores.shape[2:] != self.labels.shape[1:]:
            raise ValueError("SegmentationOutput: scores and labels disagree on batch or image size: "
                             f"{tuple(self.scores.shape)} vs {tuple(self.labels.shape)}")
        if self.scores.shape[1] != len(self.class_names):
            raise ValueError(f"SegmentationOutput: {self.scores.shape[1]} score channels for "
                             f"{len(self.class_names)} class names")


@runtime_checkable
class Segmenter(Protocol):
    """The interface of every method."""

    config: MethodConfig

    def segment(self, images: torch.Tensor | Sequence[torch.Tensor], class_names: Sequence[str],
                image_labels: torch.Tensor | None = None) -> SegmentationOutput:
        """images: RGB uint8, (B, 3, H, W) or a list of (3, H, W); class_names: the C candidate classes;
        image_labels: optional (B, C) bool of the classes present (the weakly-supervised setting)."""
        ...


@dataclass
class DemoEntry:
    """How ``weakseg demo`` runs one method on the toy world (what its recipe in :data:`TOY_DEMOS` returns).

    method: the segmenter as the demo scores it (its toy configuration, on the committed toy weights);
    baseline: the method's own unrefined starting point, scored the same way (its issue names it);
    note: one line for the report saying what the baseline is.
    The demo calls ``segment(images, class_names, image_labels)`` on held-out toy scenes (uint8 RGB,
    the toy world's classes with background first, the scenes' image-level labels).
    """

    method: Segmenter
    baseline: Segmenter
    note: str = ""


def check_images(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Validate RGB uint8 images and return them as a list of (3, H, W) tensors."""
    items = list(images) if not isinstance(images, torch.Tensor) or images.dim() == 4 else [images]
    if not items:
        raise ValueError("images: expected at least one image")
    for i, im in enumerate(items):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] != 3:
            shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"images[{i}]: expected an RGB image of shape (3, H, W), got {shape}")
        if im.dtype != torch.uint8:
            raise TypeError(f"images[{i}]: expected dtype uint8 (RGB 0..255), got {im.dtype}")
    return items


# the names that mark channel 0 as the background class (``segment``'s class convention)
BACKGROUND_NAMES = ("background", "bg", "_background_", "backgroud")


def has_background(class_names: Sequence[str]) -> bool:
    """Whether channel 0 of ``class_names`` is the background class."""
    return len(class_names) > 0 and str(class_names[0]).strip().lower() in BACKGROUND_NAMES


def image_label_mask(image_labels: torch.Tensor | None, B: int, C: int, device) -> torch.Tensor:
    """(B, C) bool of the allowed classes: the image-level labels, or all classes when None."""
    if image_labels is None:
        return torch.ones(B, C, dtype=torch.bool, device=device)
    if not isinstance(image_labels, torch.Tensor) or image_labels.shape != (B, C):
        shape = tuple(image_labels.shape) if isinstance(image_labels, torch.Tensor) else type(image_labels).__name__
        raise ValueError(f"image_labels: expected a (B, C) = ({B}, {C}) bool tensor, got {shape}")
    return image_labels.to(device=device, dtype=torch.bool)


@dataclass
class SegmentInputs:
    """The checked arguments of ``Segmenter.segment`` (:func:`check_segment_inputs`)."""

    images: list[torch.Tensor]
    class_names: list[str]
    size: tuple[int, int]
    background: bool
    allowed: torch.Tensor  # (B, C) bool on the CPU: the image-level labels, or all True

    @property
    def batch(self) -> int:
        return len(self.images)


def check_segment_inputs(images, class_names: Sequence[str], image_labels: torch.Tensor | None = None, *,
                         background: str = "optional", min_foreground: int = 0) -> SegmentInputs:
    """The one check of ``segment(images, class_names, image_labels)`` every method runs: RGB uint8 images of
    one size (one call returns one (B, C, H, W) tensor), a list of distinct non-empty class names (a string is
    not a list), the background first where ``background="required"``, at least ``min_foreground``
    non-background classes, and image labels of shape (B, C). Each error names the argument."""
    items = check_images(images)
    sizes = sorted({tuple(int(v) for v in im.shape[-2:]) for im in items})
    if len(sizes) != 1:
        raise ValueError(f"images: one batch must share one size (scores are (B, C, H, W)), got sizes {sizes}; "
                         f"segment them separately (one call per image size)")
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise ValueError(f"class_names: expected a list of class names, got {type(class_names).__name__} "
                         f"{class_names!r}")
    names = [c if isinstance(c, str) else str(c) for c in class_names]
    if not names:
        raise ValueError("class_names: expected at least one class")
    empty = [i for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise ValueError(f"class_names: empty class name at position {empty[0]} of {names}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ValueError(f"class_names: {n!r} is given twice (positions {seen[n]} and {i}); give each class once")
        seen[n] = i
    bg = has_background(names)
    if background not in ("optional", "required"):
        raise ValueError(f"check_segment_inputs: background must be 'optional' or 'required', got {background!r}")
    if background == "required" and not bg:
        raise ValueError(f"class_names: this method needs the background first (e.g. ['background', ...]), got "
                         f"{names}")
    if len(names) - int(bg) < min_foreground:
        raise ValueError(f"class_names: expected at least {min_foreground} (non-background) class(es), got {names}")
    allowed = image_label_mask(image_labels, len(items), len(names), torch.device("cpu"))
    return SegmentInputs(items, names, sizes[0], bg, allowed)


def list_methods() -> list[str]:
    return METHODS.names()


def create(name: str, config_file: str | Path | None = None, set_options: Sequence[str] = (), **overrides: Any):
    """Build the method ``name`` with its config: defaults < config_file < overrides < set_options."""
    cls = METHODS.get(name)
    cfg_cls = METHODS.config_class(name) or MethodConfig
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(check_option_types(load_config_file(config_file), cfg_cls, f"config file {config_file}"))
    values.update(overrides)
    values.update(parse_set_options(set_options, cfg_cls))
    cfg = cfg_cls.from_dict(values)
    if hasattr(cfg, "device"):
        check_device(cfg.device, f"{name}: device")
    try:
        return cls(cfg)
    except HubUnavailableError as e:
        raise HubUnavailableError(f"{e} ({_model_setting_hint(name, cfg, str(e))})") from None


def _model_setting_hint(name: str, cfg: Any, message: str) -> str:
    """Which setting of ``cfg`` named the hub model of ``message``, and how to run offline instead."""
    named = [f.name for f in fields(cfg) if isinstance(getattr(cfg, f.name), str) and getattr(cfg, f.name)
             and f"'{getattr(cfg, f.name)}" in message]
    where = (f"set by {', '.join(f'{k}={getattr(cfg, k)!r}' for k in named)}; name a local directory there"
             if named else "name a local directory in the model setting")
    toy = " or use `--set preset=toy` (the committed toy models)" if "toy" in getattr(cfg, "PRESETS", {}) else ""
    return f"{name}: {where}{toy}"
