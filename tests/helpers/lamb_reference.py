"""The oracle the LAMB tests compare against (tests only): a plain per-tensor LAMB step."""
import torch

from training.engine.lamb import DEFAULT_MAX_TRUST, DEFAULT_MIN_TRUST


def reference_lamb_step(params, grads, states, *, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                        bias_correction=True, min_trust=DEFAULT_MIN_TRUST, max_trust=DEFAULT_MAX_TRUST,
                        adapt=True):
    """One LAMB step, one tensor at a time, written for reading not speed.
    adapt=False: no layer adaptation (trust exactly 1).

    params/grads: lists of tensors (params updated in place); states: list of dicts, same keys as
    Lamb's state ('step', 'exp_avg', 'exp_avg_sq'), empty dicts on the first step.
    Returns the trust ratio used for each tensor.
    """
    beta1, beta2 = betas
    trusts = []
    for w, g, st in zip(params, grads, states):
        if not st:
            st.update(step=0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
        st["step"] += 1
        t = st["step"]
        m = st["exp_avg"] = beta1 * st["exp_avg"] + (1 - beta1) * g
        v = st["exp_avg_sq"] = beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g
        if bias_correction:
            m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        else:
            m_hat, v_hat = m, v
        update = m_hat / (v_hat.sqrt() + eps) + weight_decay * w
        w_norm, u_norm = w.norm().item(), update.norm().item()
        if not adapt or w_norm == 0 or u_norm == 0:
            trust = 1.0
        else:
            trust = min(max(w_norm / u_norm, min_trust), max_trust)
        w.sub_(lr * trust * update)
        trusts.append(trust)
    return trusts


# A module with every kind of parameter the LAMB groups tell apart (HF-style names, a LayerNorm matched by type,
# a bias-free Linear, a frozen Linear).
class TinyLambModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.LayerNorm = torch.nn.LayerNorm(8)  # HF-style name
        self.dense = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)  # matched by type, not name
        self.out = torch.nn.Linear(8, 3, bias=False)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.out(self.norm(self.dense(self.LayerNorm(self.embed(x)))))
