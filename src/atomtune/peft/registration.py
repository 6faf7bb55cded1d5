"""Atoms as a PEFT method: a member ``PeftType.ATOMS`` and PEFT's registry entries.

``register_peft_method`` takes only names that ``peft.utils.peft_types.PeftType`` already holds, and
that ``str`` enum is closed. The member is added as ``Enum`` builds its own members (an instance of
the class with ``_name_`` and ``_value_``, entered in the name and value maps and the class
namespace), so everything PEFT does with a type works on it: ``PeftType("ATOMS")`` and
``PeftType["ATOMS"]`` return it, ``list(PeftType)`` lists it, it compares and hashes as the string
``"ATOMS"`` (what ``save_pretrained`` writes and ``from_pretrained`` looks up), and it pickles and
deep-copies as itself. The other ways are more fragile: a plain string type skips
``register_peft_method`` (its checks, and PEFT code that reads ``peft_type.value``), and replacing
the enum class leaves every module that imported it with the old one.
``tests/peft_method/test_peft_registration.py`` pins each property, and a fresh interpreter loading
a saved folder.

Registration happens when ``atomtune.peft`` is imported; a saved adapter loads in a new session
once that import ran (PEFT has no entry point for methods outside its own package).
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

from atomtune.errors import AtomtuneError

NAME = "atoms"  # PEFT's method name; its type is NAME.upper(), its prefix NAME + "_"


def add_peft_type(name: str) -> PeftType:
    """The member ``PeftType.<name>``, added if PEFT lacks it (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses members; this is not one yet
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(config_cls: type, model_cls: type) -> None:
    """Add ``PeftType.ATOMS`` and register the method with PEFT, once per interpreter."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = add_peft_type(NAME.upper())
    known = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if known is config_cls:
        return
    if known is not None:
        if known.__module__ != config_cls.__module__:
            raise AtomtuneError(
                f"PEFT already has a method named {NAME!r} ({known.__module__}.{known.__name__})"
            )
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

        # atomtune.peft imported anew (importlib.reload): its new classes replace the old ones

        for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=NAME + "_")
