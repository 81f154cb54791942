"""DDP with 2 CPU processes (gloo): the foundation's methods train and ranks agree."""

from __future__ import annotations

import pytest
import torch
from distributed import TRAIN_PRELUDE, run_script


@pytest.mark.slow
def test_partial_finetuning_under_ddp_keeps_ranks_identical(tmp_path):
    ranks = run_script(
        TRAIN_PRELUDE
        + """
from conftest import tiny_bert_classifier
from lightning_peft import SequenceClassifier
from lightning_peft.callbacks import PartialFinetuning
from lightning_peft.methods.base import trainable_named_parameters

module = SequenceClassifier(tiny_bert_classifier(), num_labels=2, lr=1e-2)
before = {k: v.clone() for k, v in module.state_dict().items()}
t = trainer(4, callbacks=[PartialFinetuning(parts=["bias"], last_n_layers=1)])
t.fit(module, train_dataloaders=loader("cls"))
after = module.state_dict()
trainable = dict(trainable_named_parameters(module))
frozen_same = all(torch.equal(after[k], before[k]) for k in before if k not in trainable)
moved = sum(not torch.equal(after[k], before[k]) for k in trainable)
save_rank(t, {**{k: v for k, v in trainable.items()}, "frozen_same": torch.tensor(frozen_same), "moved": torch.tensor(moved)})
""",
        tmp_path,
    )
    assert len(ranks) == 2
    r0, r1 = ranks
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"
    assert bool(r0["frozen_same"])
    assert int(r0["moved"]) > 0
