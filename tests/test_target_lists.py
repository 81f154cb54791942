"""Every list of module names a user writes is checked: an entry that names nothing is refused with a suggestion.

LoRA and (IA)³ (``target_modules``, ``exclude_modules``, ``modules_to_save``, and (IA)³'s
``feedforward_modules``) and ``FourBitPrecision(skip_modules=...)``, on the bare Hugging
Face model and through our LightningModule alike; regexes match the same layers both ways.
"""

from __future__ import annotations

import pytest

from lightning_peft import CausalLM
from lightning_peft.callbacks import IA3, LoRA
from lightning_peft.methods.ia3 import ia3_layers
from lightning_peft.quantization.convert import quantizable_modules

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

WHERE = {"bare": tiny_llama, "module": lambda: CausalLM(tiny_llama())}

TYPOS = {
    "lora target_modules": (
        lambda: LoRA(target_modules=["q_proj", "v_prj"]),
        "target_modules",
        "v_prj",
        "v_proj",
    ),
    "lora exclude_modules": (
        lambda: LoRA(target_modules="all-linear", exclude_modules=["o_prj"]),
        "exclude_modules",
        "o_prj",
        "o_proj",
    ),
    "lora modules_to_save": (
        lambda: LoRA(target_modules=["q_proj"], modules_to_save=["lm_hed"]),
        "modules_to_save",
        "lm_hed",
        "lm_head",
    ),
    "ia3 target_modules": (
        lambda: IA3(target_modules=["k_proj", "v_prj", "down_proj"], feedforward_modules=["down_proj"]),
        "target_modules",
        "v_prj",
        "v_proj",
    ),
    "ia3 exclude_modules": (lambda: IA3(exclude_modules=["k_prj"]), "exclude_modules", "k_prj", "k_proj"),
    "ia3 modules_to_save": (lambda: IA3(modules_to_save=["lm_hed"]), "modules_to_save", "lm_hed", "lm_head"),
    "ia3 feedforward_modules, default targets": (
        lambda: IA3(feedforward_modules=["down_prj"]),
        "feedforward_modules",
        "down_prj",
        "down_proj",
    ),
    "ia3 feedforward_modules, regex targets": (
        lambda: IA3(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=["down_prj"]),
        "feedforward_modules",
        "down_prj",
        "down_proj",
    ),
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("case", list(TYPOS))
def test_a_typo_in_any_name_list_is_refused_naming_the_entry_and_the_closest_names(case, where):
    make, argument, entry, suggestion = TYPOS[case]
    model = WHERE[where]()
    with pytest.raises(
        ValueError, match=rf"{argument} entry '{entry}' .*did you mean '{suggestion}'"
    ) as info:
        make().apply(model)
    listed = str(info.value).split("exist: ")[-1].split("Targeted layers: ")[-1]
    assert not any(part.strip() in ("", "0", "1") for part in listed.split(",")), (
        "no empty or positional names"
    )
    assert not [n for n, _ in model.named_modules() if n.endswith((".lora", ".ia3"))], "nothing was applied"


@pytest.mark.parametrize("where", list(WHERE))
def test_ia3_feedforward_layers_must_be_targets(where):
    with pytest.raises(ValueError, match=r"'up_proj' matches none of the layers \(IA\)³ targets"):
        IA3(feedforward_modules=["up_proj"]).apply(WHERE[where]())  # defaults target k, v, down
    with pytest.raises(ValueError, match=r"feedforward_modules='.*up_proj' matches none"):
        IA3(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=r".*\.up_proj").apply(
            WHERE[where]()
        )


def test_ia3_anchored_regexes_pick_the_same_layers_through_the_module():
    targets, feedforward = (
        r"model\.layers\.0\.(self_attn\.k_proj|mlp\.down_proj)",
        r"model\.layers\.0\.mlp\.down_proj",
    )
    bare = IA3(target_modules=targets, feedforward_modules=feedforward).apply(tiny_llama())
    module = IA3(target_modules=targets, feedforward_modules=feedforward).apply(CausalLM(tiny_llama()))
    want = {n: layer.feedforward for n, layer in ia3_layers(bare)}
    assert want == {"model.layers.0.self_attn.k_proj": False, "model.layers.0.mlp.down_proj": True}
    assert {n.removeprefix("backbone."): layer.feedforward for n, layer in ia3_layers(module)} == want


@pytest.mark.parametrize("where", list(WHERE))
def test_four_bit_skip_modules_typo_is_refused(where):
    model = WHERE[where]()
    with pytest.raises(ValueError, match=r"skip_modules entry 'down_prj' .*did you mean 'down_proj'"):
        quantizable_modules(model, ["down_prj"])
    kept = {n for n, _ in model.named_modules()} - {n for n, _ in quantizable_modules(model, ["down_proj"])}
    assert any(n.endswith("mlp.down_proj") for n in kept)
    prefix = "backbone." if where == "module" else ""
    full_name = f"{prefix}model.layers.0.mlp.down_proj"  # names relative to the model passed work too
    assert full_name not in {n for n, _ in quantizable_modules(model, [full_name])}
