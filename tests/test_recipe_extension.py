"""The recipe table's extension point: a row that declares an extra trainable network.

A toy row (consistency training plus a one-layer critic whose output joins the
loss, stepped by the row's own optimiser in ``after_step``) is added to the
table for the test: the loop wraps the critic once under the chosen precision,
the row's hook trains it, and its weights are saved in the checkpoint set and
restored on resume, without a line of the loop knowing the row.
"""

import dataclasses

import pytest
import torch

from cm import logger, recipes

from test_train_util import cm_loop, one_thread, synthetic_data  # noqa: F401  (one_thread: autouse fixture)


class Critic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.autocast = []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.conv(x).float().mean(dim=(1, 2, 3))


def critic_loss(diffusion, nets, x_start, level, model_kwargs, options):
    terms = recipes.RECIPES["consistency_training"].loss(diffusion, nets, x_start, level, model_kwargs, options)
    return dict(terms, loss=terms["loss"] + 0.1 * nets.extra["critic"](x_start) ** 2)


def critic_step(loop):
    critic = loop.extra_networks["critic"]
    with torch.no_grad():
        for p in critic.parameters():
            p -= 0.5 * p.grad
            p.grad = None


@pytest.fixture
def toy_row(monkeypatch):
    row = dataclasses.replace(
        recipes.RECIPES["consistency_training"], name="toy", loss=critic_loss,
        extra_networks=("critic",), after_step=critic_step,
    )
    monkeypatch.setitem(recipes.RECIPES, "toy", row)
    return row


def test_an_extra_network_is_wrapped_trained_saved_and_resumed(tmp_path, toy_row):
    logger.configure(dir=str(tmp_path / "log"), format_strs=[])
    try:
        critic = Critic()
        start = [p.detach().clone() for p in critic.parameters()]
        loop = cm_loop(tmp_path, "toy", teacher=False, precision="bf16", total_training_steps=2,
                       extra_networks={"critic": critic})
        loop.run_loop()
        assert critic.autocast and all(critic.autocast)  # every call under bf16 autocast
        assert any(not torch.equal(a, b) for a, b in zip(start, critic.parameters()))  # its optimiser ran
        saved = torch.load(tmp_path / "critic000002.pt", weights_only=True)
        assert all(torch.equal(saved[k], v) for k, v in critic.state_dict().items())

        fresh = Critic()
        resumed = cm_loop(tmp_path, "toy", teacher=False, resume_checkpoint="auto", total_training_steps=2,
                          extra_networks={"critic": fresh})
        assert resumed.step == 2
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), critic.parameters()))
        with pytest.raises(ValueError, match="extra networks"):
            cm_loop(tmp_path / "other", "toy", teacher=False)
    finally:
        logger.reset()
