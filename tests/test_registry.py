"""Registry: names, duplicates, import paths and file paths, and user-defined losses loaded through them."""

import textwrap

import pytest
import torch

from sera_openrlhf.errors import ConfigError
from sera_openrlhf.losses import LOSSES, FunctionLoss, PreferenceBatch, build_loss
from sera_openrlhf.registry import Registry

# A user loss file: a plain function (DPO by hand, with a `scale` param the CLI never passes) and a DAALoss subclass.
USER_LOSSES = textwrap.dedent(
    """
    import torch.nn.functional as F
    from sera_openrlhf.losses import DAALoss, LossOutput

    def my_dpo(batch, beta=0.1, scale=1.0):
        h = (batch.policy_chosen_logps - batch.policy_rejected_logps) - (
            batch.reference_chosen_logps - batch.reference_rejected_logps)
        return LossOutput(-scale * F.logsigmoid(beta * h),
                          beta * (batch.policy_chosen_logps - batch.reference_chosen_logps),
                          beta * (batch.policy_rejected_logps - batch.reference_rejected_logps))

    def returns_tuple(batch):
        return batch.policy_chosen_logps, batch.policy_rejected_logps

    def returns_scalar(batch):
        return LossOutput(batch.policy_chosen_logps.sum(), batch.policy_chosen_logps, batch.policy_rejected_logps)

    def returns_detached(batch):
        return LossOutput(batch.policy_chosen_logps.detach(), batch.policy_chosen_logps, batch.policy_rejected_logps)

    class LogratioGap(DAALoss):
        def __init__(self, beta=0.1, gamma=0.0):
            super().__init__(beta)
            self.gamma = gamma

        def compute_losses(self, batch):
            return -(batch.policy_chosen_logps - batch.policy_rejected_logps) + self.gamma

    NOT_A_LOSS = 3
    """
)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_losses.py"
    path.write_text(USER_LOSSES)
    return path


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    # Unique module name per test so Python's import cache never serves another test's file.
    name = f"sera_test_user_losses_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def batch(requires_grad=True):
    pc = torch.tensor([-3.0, -4.0], requires_grad=requires_grad)
    return PreferenceBatch(pc, torch.tensor([-4.0, -3.0]), torch.tensor([-3.5, -3.5]), torch.tensor([-3.5, -3.5]))


# ---------------------------------------------------------------- registry basics


def test_register_get_names_contains():
    reg = Registry("selector")

    @reg.register("b")
    def b():
        pass

    a = reg.register("a")(object())
    assert reg.get("a") is a and reg.get("b") is b  # decorator returns the object unchanged
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_duplicate_needs_override():
    reg = Registry("selector")
    reg.register("x")(1)
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("x")(2)
    reg.register("x", override=True)(3)
    assert reg.get("x") == 3


@pytest.mark.parametrize("bad", ["", "a:b"])
def test_invalid_names(bad):
    with pytest.raises(ConfigError):
        Registry("selector").register(bad)


def test_unknown_name_lists_registered_and_names_flag():
    reg = Registry("selector")
    reg.register("top_k")(1)
    reg.register("threshold")(2)
    with pytest.raises(ConfigError) as e:
        reg.get("topk", flag="--sera.selector")
    msg = str(e.value)
    assert msg.startswith("--sera.selector:") and "unknown selector 'topk'" in msg
    assert "threshold, top_k" in msg


def test_losses_registry_has_builtins():
    assert {"dpo", "ipo", "slic", "simpo", "rdpo"} <= set(LOSSES.names())


# ---------------------------------------------------------------- import paths


def test_import_path(user_module):
    reg = Registry("loss")
    assert reg.get(f"{user_module}:NOT_A_LOSS") == 3
    assert reg.get("os.path:join.__name__") == "join"  # dotted attributes


def test_file_path(user_file):
    reg = Registry("loss")
    fn = reg.get(f"{user_file}:my_dpo")
    assert fn.__name__ == "my_dpo"
    assert reg.get(f"{user_file}:my_dpo") is fn  # same file -> same module, loaded once


@pytest.mark.parametrize(
    "spec,match",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("os.path:no_such_attr", "has no attribute 'no_such_attr'"),
        ("/no/such/dir/losses.py:f", "file '/no/such/dir/losses.py' not found"),
        ("os.path:", "neither"),
    ],
)
def test_bad_import_paths(spec, match):
    with pytest.raises(ConfigError, match=match) as e:
        Registry("loss").get(spec, flag="--sera.loss")
    assert str(e.value).startswith("--sera.loss:")


def test_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="RuntimeError: boom"):
        Registry("loss").get(f"{path}:f")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(ConfigError, match="SyntaxError"):
        Registry("loss").get(f"{tmp_path / 'syntax.py'}:f")


# ---------------------------------------------------------------- user losses through build_loss


@pytest.mark.parametrize("via", ["module", "file"])
def test_custom_loss_function(via, user_module, user_file):
    spec = f"{user_module}:my_dpo" if via == "module" else f"{user_file}:my_dpo"
    loss = build_loss(spec, beta=0.5, gamma=1.0, label_smoothing=0.0)  # extra params are dropped, not errors
    assert isinstance(loss, FunctionLoss) and loss.needs_reference
    b = batch()
    out = loss(b)
    torch.testing.assert_close(out.losses, build_loss("dpo", beta=0.5)(b).losses)
    assert not out.chosen_rewards.requires_grad


def test_custom_loss_class_by_file(user_file):
    loss = build_loss(f"{user_file}:LogratioGap", beta=0.5, gamma=2.0, delta=9.0)
    assert (loss.beta, loss.gamma) == (0.5, 2.0)
    torch.testing.assert_close(loss(batch()).losses, torch.tensor([1.0, 3.0]))


@pytest.mark.parametrize(
    "attr,match",
    [
        ("returns_tuple", "returned tuple"),
        ("returns_scalar", r"losses of shape \(\)"),
        ("returns_detached", "no gradient"),
    ],
)
def test_custom_loss_wrong_return_names_callback(user_file, attr, match):
    spec = f"{user_file}:{attr}"
    with pytest.raises(ConfigError, match=match) as e:
        build_loss(spec)(batch())
    assert f"loss callback '{spec}'" in str(e.value)


def test_non_loss_objects_rejected(user_file):
    with pytest.raises(ConfigError, match="not a DAALoss subclass or a function"):
        build_loss(f"{user_file}:NOT_A_LOSS")
    with pytest.raises(ConfigError, match="does not subclass"):
        build_loss("collections:OrderedDict")
