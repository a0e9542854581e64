import pytest
import torch

from excise.verify.relearn import RelearnSettings, relearn
from tests.helpers import toy_domain, toy_model


def test_relearning_raises_trained_fact_and_keeps_model():
    model = toy_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    facts = toy_domain().forget
    curve = relearn(model, facts[:3], facts[3:], RelearnSettings(steps=12, lr=2e-2, batch_size=3, eval_every=4))
    assert curve.steps == [0, 4, 8, 12]
    assert len(curve.train_loss) == 12
    assert curve.train_loss[-1] < curve.train_loss[0]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_relearn_input_checks():
    model = toy_model()
    facts = toy_domain().forget
    with pytest.raises(ValueError, match="overlap"):
        relearn(model, facts[:3], facts[2:])
    with pytest.raises(ValueError, match="at least one training fact"):
        relearn(model, [], facts)
    with pytest.raises(ValueError, match="steps"):
        RelearnSettings(steps=0)
