"""``TrainSettings``: every setting of ``atomtune train``, checked before anything runs, and the
YAML/TOML settings file they may come from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomtune.diffusion.data import (
    check_prompts,
)
from atomtune.diffusion.methods import DEFAULT_ATOM_BUDGET, DEFAULT_FORM, MethodConfig
from atomtune.diffusion.pipeline import DEFAULT_PRETRAINED
from atomtune.errors import AtomtuneError
from atomtune.validation import check_number, check_output_not_input, check_seed

OPTIMIZERS = ("came", "adamw")
PRECISIONS = ("no", "bf16", "fp16")
#: settings that fix the adapter's shape: a checkpoint only resumes into the same ones
STRUCTURE = ("method", "form", "num_atoms", "atom_budget", "rank", "oft_r", "atoms")


@dataclass
class TrainSettings:
    """Everything ``atomtune train`` takes, as flags or as a YAML/TOML settings file."""

    instance_data: str = ""
    instance_prompt: str = ""
    output_dir: str = ""
    pretrained: str = DEFAULT_PRETRAINED
    variant: str | None = None
    dtype: str = "auto"
    local_files_only: bool = False
    token: str | None = "sks"
    class_prompt: str | None = None
    class_data: str | None = None
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    method: str = "atoms"
    form: str = DEFAULT_FORM  # atoms: "projections" (LoRA's targets) or "attention" (the paper's update)
    num_atoms: int | str | None = (
        None  # None: the form's default; "parity": LoRA rank ``rank``'s (see resolved)
    )
    atom_budget: int = DEFAULT_ATOM_BUDGET
    rank: int = 16
    oft_r: int = 4
    atoms: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "came"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 15
    max_steps: int | None = None
    batch_size: int = 1
    resolution: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    guidance_scale: float = 4.5
    checkpoint_every: int = 0
    checkpoints_total_limit: int = 3  # checkpoints kept (the newest); 0 keeps every one
    resume: str | None = None

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, settings_file: str | Path | None = None, **overrides: Any) -> TrainSettings:
        """Defaults < settings file < ``overrides`` (the flags given on the command line)."""
        values = read_settings_file(settings_file) if settings_file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AtomtuneError(
                f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        settings = cls(**data)
        settings.validate()
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for name in ("instance_data", "instance_prompt", "output_dir"):
            if not getattr(self, name):
                raise AtomtuneError(f"{name.replace('_', '-')} is required")
        _check_type("sample_prompts", self.sample_prompts, list)
        _check_type("atoms", self.atoms, dict)
        for name in ("epochs", "batch_size", "num_class_images", "sample_steps"):
            _positive_int(name, getattr(self, name))
        for name in ("max_steps", "resolution"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("sample_every", "checkpoint_every", "checkpoints_total_limit"):
            check_number(name, getattr(self, name), integer=True, minimum=0)
        check_seed("seed", self.seed)
        for name in ("prior_loss_weight", "guidance_scale", "weight_decay", "max_grad_norm"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("learning_rate", self.learning_rate, above=0)
        for name in (
            "instance_data",
            "instance_prompt",
            "output_dir",
            "pretrained",
            "dtype",
            "method",
            "form",
        ):
            _check_type(name, getattr(self, name), str)
        for name in ("variant", "token", "class_prompt", "class_data", "resume"):
            if getattr(self, name) is not None:
                _check_type(name, getattr(self, name), str)
        if not all(isinstance(p, str) for p in self.sample_prompts):
            raise AtomtuneError(f"sample_prompts must be a list of strings, got {self.sample_prompts!r}")
        check_output_not_input(self.output_dir, (self.instance_data,), "output_dir")
        if self.optimizer not in OPTIMIZERS:
            raise AtomtuneError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.mixed_precision not in PRECISIONS:
            raise AtomtuneError(
                f"mixed_precision must be one of {', '.join(PRECISIONS)}; got {self.mixed_precision!r}"
            )
        self.method_config()
        check_prompts(self.instance_prompt, self.token, self.class_prompt)

    def method_config(self) -> MethodConfig:
        return MethodConfig(
            self.method, self.num_atoms, self.rank, self.oft_r, dict(self.atoms), self.atom_budget, self.form
        )

    def resolved(self, model, target_modules: tuple[str, ...]) -> TrainSettings:
        """These settings with ``num_atoms`` (the form's default, or "parity") replaced by its count on
        ``model`` (atoms only), so the card, the checkpoints' structure and a resumed run all see the
        number trained."""
        if self.method != "atoms":
            return self
        count = self.method_config().resolved(model, target_modules).num_atoms
        return dataclasses.replace(self, num_atoms=count)

    def weight_dtype(self) -> str:
        """The base model's weights: ``dtype`` if given, else the mixed-precision dtype (float32 for "no")."""
        if self.dtype != "auto":
            return self.dtype
        return {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.mixed_precision]

    def structure(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in STRUCTURE}


def _check_type(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise AtomtuneError(f"{name} must be a {kind.__name__}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AtomtuneError(f"{name} must be a positive integer, got {value!r}")


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or TOML (``.toml``) file holding one table of settings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AtomtuneError(f"settings file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AtomtuneError(
            f"settings file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AtomtuneError(f"{path} is not valid YAML: {exc}") from exc
    elif suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AtomtuneError(f"{path} is not valid TOML: {exc}") from exc
    else:
        raise AtomtuneError(f"settings file must end in .yaml, .yml or .toml: {path}")
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise AtomtuneError(f"{path} must hold a table of settings (key: value)")
    return data
