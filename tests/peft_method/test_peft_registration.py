"""``PeftType.ATOMS``: a member PEFT cannot tell from its own ones, registered once, and a saved
folder that a new interpreter loads after ``import atomtune.peft`` alone."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils.peft_types import PeftType
from peft_helpers import move_every_tensor, peft_config, pixart, pixart_inputs, run

from atomtune.peft import AtomsModel, AtomsPeftConfig, atoms_of
from atomtune.peft.registration import add_peft_type, register


def test_atoms_is_a_peft_type_like_peft_own_ones():
    member = PeftType.ATOMS
    assert PeftType("ATOMS") is member and PeftType["ATOMS"] is member
    assert isinstance(member, PeftType) and isinstance(member, str)
    assert member == "ATOMS" and hash(member) == hash("ATOMS") and member.value == "ATOMS"
    assert member in list(PeftType) and "ATOMS" in PeftType.__members__ and member in PeftType
    assert list(PeftType)[-1] is member and len(PeftType) == len(PeftType.__members__)
    assert pickle.loads(pickle.dumps(member)) is member and copy.deepcopy(member) is member
    assert json.dumps({"peft_type": member}) == '{"peft_type": "ATOMS"}'
    assert PeftType.LORA is PeftType("LORA")  # PEFT's own members untouched


def test_registered_once_with_pefts_registry():
    for _ in range(2):  # a second import or call changes nothing
        register(AtomsPeftConfig, AtomsModel)
        assert add_peft_type("ATOMS") is PeftType.ATOMS
    assert list(PeftType).count(PeftType.ATOMS) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ATOMS"] is AtomsPeftConfig  # a JSON string finds the classes
    assert PEFT_TYPE_TO_TUNER_MAPPING["ATOMS"] is AtomsModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["ATOMS"] == AtomsModel.prefix == "atoms_"


def test_config_survives_save_pretrained(tmp_path):
    config = peft_config(atoms_pattern={"transformer_blocks.0.attn1.to_q": 3}, learn_lambda=False)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ATOMS"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is AtomsPeftConfig and loaded.peft_type is PeftType.ATOMS
    assert loaded.to_dict() == config.to_dict()


_LOAD = """
import sys, torch
import atomtune.peft  # the registration: nothing else of atomtune's before PEFT reads the folder
from peft import PeftModel
from atomtune.tiny import tiny_pixart
sys.path.insert(0, sys.argv[2])
from peft_helpers import pixart_inputs, run
model = PeftModel.from_pretrained(tiny_pixart(seed=0).double(), sys.argv[1])
torch.save(run(model, pixart_inputs()), sys.argv[1] + "/out.pt")
"""


def test_a_fresh_interpreter_loads_the_saved_folder(tmp_path):
    peft_model = get_peft_model(pixart(), peft_config())
    move_every_tensor(atoms_of(peft_model), seed=4)
    peft_model.save_pretrained(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    here = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(tmp_path), here], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), run(peft_model, pixart_inputs()))
