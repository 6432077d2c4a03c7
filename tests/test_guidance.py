"""guidance.py: the CFG formula, one batched call, negative prompts, diffusers' guidance rescale."""

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from latentforge.guidance import classifier_free_guidance, rescale_guidance


class Recorder:
    """A model whose output is a known function of its inputs, counting its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context=None, class_labels=None):
        self.calls.append(x.shape[0])
        out = x * 0.5 + t.float().reshape(-1, 1, 1, 1) / 100
        if context is not None:
            out = out + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        if class_labels is not None:
            out = out + class_labels.float().reshape(-1, 1, 1, 1)
        return out


def test_cfg_is_one_call_and_matches_the_formula():
    m = Recorder()
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([10, 20, 30])
    ctx, neg = torch.randn(3, 5, 8), torch.randn(1, 5, 8)  # one negative prompt for the batch
    out = classifier_free_guidance(m, {"context": ctx}, {"context": neg}, scale=7.5)(x, t)
    assert m.calls == [6]  # cond and uncond in ONE model call of batch 2B
    cond_out = x * 0.5 + t.reshape(-1, 1, 1, 1) / 100 + ctx.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    uncond_out = x * 0.5 + t.reshape(-1, 1, 1, 1) / 100 + neg.mean()
    torch.testing.assert_close(out, uncond_out + 7.5 * (cond_out - uncond_out))


def test_scale_one_is_the_conditional_model_alone():
    m = Recorder()
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([1, 2])
    labels = torch.tensor([3, 1])
    out = classifier_free_guidance(m, {"class_labels": labels}, {"class_labels": torch.tensor([9])}, 1.0)(x, t)
    assert m.calls == [2]
    torch.testing.assert_close(out, m(x, t, class_labels=labels))


def test_class_guidance_uses_the_null_label():
    m = Recorder()
    x, t = torch.randn(2, 1, 1, 1), torch.tensor([0, 0])
    out = classifier_free_guidance(m, {"class_labels": torch.tensor([2, 4])}, {"class_labels": torch.tensor([9])},
                                   3.0)(x, t)
    base = x * 0.5
    torch.testing.assert_close(out, base + 9 + 3.0 * (torch.tensor([2.0, 4.0]).reshape(-1, 1, 1, 1) - 9))


def test_guidance_rescale_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(rescale_guidance(guided, cond, phi), rescale_noise_cfg(guided, cond, phi))
    # φ = 1: the result has exactly the conditional branch's per-sample std
    out = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
