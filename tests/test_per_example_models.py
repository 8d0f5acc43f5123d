"""method='per_example' on the models people train: frozen layers, recurrent layers, tied and functional weights,
position embeddings, bare parameters and a small GPT. Exact against every per-example gradient, or refused."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from gns_widget.per_example import PerExampleNorms, norm_layer_params
from tests.exact import sq_norms_by_backward
from tests.test_per_example import _Conv
from tests.tiny_gpt import TinyGPT, markov_tokens, next_token_loss

B = 6


def _trainable_grads(model, loss_func, x, y, chunk: int = 4096):
    "(N, P) per-example gradients of the trainable parameters only, by torch.func (frozen ones held fixed)."
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

    def loss_one(p, xi, yi):
        return loss_func(functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))
    rows = []
    for i in range(0, len(x), chunk):
        gs = g(trainable, x[i:i + chunk], y[i:i + chunk])
        rows.append(torch.cat([v.reshape(len(v), -1) for v in gs.values()], 1).double())
    return torch.cat(rows)


def _exact_sq_norms(model, loss_func, x, y, vmapped=True):
    "|g_j|² of the trainable parameters: torch.func, or one backward per example where vmap cannot batch (GRU)."
    if vmapped:
        return _trainable_grads(model, loss_func, x, y).square().sum(1)
    return sq_norms_by_backward(model, loss_func, x, y)


def _exact_noise_scale(model, loss_func, x, y) -> tuple[float, float]:
    "(tr Σ, |G|²) of the trainable parameters over the whole dataset."
    g = _trainable_grads(model, loss_func, x, y)
    G = g.mean(0)
    return (g.square().sum(1).mean() - G.square().sum()).item(), G.square().sum().item()


def _norms(model, loss_func, x, y):
    with PerExampleNorms(model) as norms:
        out = model(x)
        with norms.in_loss():
            loss = loss_func(out, y)
        loss.backward()
        return norms.pop().double()


class _Recurrent(nn.Module):
    "A recurrent layer and a Linear head that reads the outputs and the final states."

    def __init__(self, kind: str, batch_first: bool = True, **kw):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.rnn = getattr(nn, kind)(4, 5, batch_first=batch_first, **kw)
        self.fc = nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        out, h = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)
        last = (h[0] + h[1] if self.kind == "LSTM" else h)[-1]
        return self.fc(out.mean(1)) + self.fc(torch.cat([last] * (out.shape[-1] // 5), 1))


class _CellLoop(nn.Module):
    "LSTMCell over time: one parameter used T times, initial states from torch.zeros(B, H)."

    def __init__(self):
        super().__init__()
        self.cell, self.fc = nn.LSTMCell(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.fc(h)


class _FunctionalTied(nn.Module):
    "An embedding whose table is also the output layer, through F.linear (no lm_head module)."

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(11, 6, padding_idx=0), nn.Linear(6, 6)

    def forward(self, idx):
        return F.linear(torch.tanh(self.lin(self.emb(idx))), self.emb.weight).mean(1)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _Attention(nn.Module):
    "nn.MultiheadAttention as people call it: need_weights=True (the default), the weights used too."

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.att, self.fc = nn.MultiheadAttention(4, 2, batch_first=batch_first), nn.Linear(4, 3)

    def forward(self, x):
        s = x if self.batch_first else x.transpose(0, 1)
        out, weights = self.att(s, s, s)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.fc(out.mean(1)) + weights.mean((1, 2)).unsqueeze(1)


class _PaddedEncoder(nn.Module):
    "A transformer encoder over padded token sequences: the padding mask is (B, T) while attention runs on (T, B, d)."

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(self.enc(self.emb(idx), src_key_padding_mask=idx == 0).mean(1))


def _padded_tokens():
    idx = torch.randint(1, 11, (B, 5))
    idx[::2, -2:] = 0  # every other sequence is padded
    return idx


def _partly_frozen_mlp():
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].requires_grad_(False)  # a frozen layer
    model[1].weight.requires_grad_(False)  # LayerNorm: weight frozen, bias trains
    model[3].weight.requires_grad_(False)  # Linear: weight frozen, bias trains
    return model


def _partly_frozen_gpt():
    model = TinyGPT()
    model.wpe.requires_grad_(False)
    model.block.c_fc.weight.requires_grad_(False)
    model.block.ln_1.bias.requires_grad_(False)
    return model


def _frozen_lstm():
    model = _Recurrent("LSTM", num_layers=2)
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.bias_ih_l1.requires_grad_(False)
    return model


_seq, _tok = (lambda: torch.randn(B, 7, 4), lambda: torch.randint(0, 3, (B,))), \
    (lambda: torch.randint(0, 11, (B, 5)), lambda: torch.randint(0, 11, (B,)))
_gpt = (lambda: markov_tokens(B, seed=3)[0], lambda: markov_tokens(B, seed=3)[1])
CASES = {  # name: (model, inputs, targets, loss, torch.func can vmap it)
    "frozen-layers-and-biases": (_partly_frozen_mlp, lambda: torch.randn(B, 5), _seq[1], nn.CrossEntropyLoss(), True),
    "lstm": (lambda: _Recurrent("LSTM"), *_seq, nn.CrossEntropyLoss(), False),
    "gru-2-layers-bidirectional-seq-first": (lambda: _Recurrent("GRU", False, num_layers=2, bidirectional=True),
                                             *_seq, nn.CrossEntropyLoss(), False),
    "rnn-relu": (lambda: _Recurrent("RNN", nonlinearity="relu"), *_seq, nn.CrossEntropyLoss(), False),
    "lstm-partly-frozen": (_frozen_lstm, *_seq, nn.CrossEntropyLoss(), False),
    "lstm-cell-loop": (_CellLoop, *_seq, nn.CrossEntropyLoss(), False),
    "functional-tied-embedding": (_FunctionalTied, *_tok, nn.CrossEntropyLoss(), True),
    "layer-called-twice": (_Twice, lambda: torch.randn(B, 4), lambda: torch.randint(0, 4, (B,)), nn.CrossEntropyLoss(),
                           True),
    "attention-weights": (lambda: _Attention(True), *_seq, nn.CrossEntropyLoss(), True),
    "attention-weights-seq-first": (lambda: _Attention(False), *_seq, nn.CrossEntropyLoss(), True),
    "transformer-padding-mask": (_PaddedEncoder, _padded_tokens, _seq[1], nn.CrossEntropyLoss(), True),
    "conv-groupnorm": (_Conv, lambda: torch.randn(B, 1, 8, 8), _seq[1], nn.CrossEntropyLoss(), True),
    "tiny-gpt": (TinyGPT, *_gpt, next_token_loss, True),
    "tiny-gpt-partly-frozen": (_partly_frozen_gpt, *_gpt, next_token_loss, True),
}


@pytest.mark.parametrize("case", CASES)
def test_per_example_norms_equal_exact(case):
    torch.manual_seed(0)
    make_model, make_x, make_y, loss_func, vmapped = CASES[case]
    model, x, y = make_model(), make_x(), make_y()
    expected = _exact_sq_norms(model, loss_func, x, y, vmapped)
    frozen = {k: p.clone() for k, p in model.named_parameters() if not p.requires_grad}
    got = _norms(model, loss_func, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert all(torch.equal(p, frozen[k]) for k, p in model.named_parameters() if k in frozen)


def test_frozen_parameters_are_not_measured():
    "Freezing a layer removes exactly its share of every example's norm."
    torch.manual_seed(0)
    model, x, y = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(B, 5), _seq[1]()
    full = _norms(model, nn.CrossEntropyLoss(), x, y)
    first = _trainable_grads(model, nn.CrossEntropyLoss(), x, y)[:, :5 * 7 + 7].square().sum(1)
    model[0].requires_grad_(False)
    torch.testing.assert_close(_norms(model, nn.CrossEntropyLoss(), x, y), full - first, rtol=1e-5, atol=0)


class _HeadInLoss(nn.Module):
    "The forward returns features; the loss applies the head (sampled softmax, a head shared with another task)."

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(5, 7), nn.Tanh()), nn.Linear(7, 3)

    def forward(self, x):
        return self.body(x)


def test_parameters_the_loss_uses_are_measured_or_refused():
    """A head applied in the loss counts per example (it was left out while p.grad held it: -84% end to end); a
    penalty added to the mean loss has no per-example gradient and is refused."""
    torch.manual_seed(0)
    model, x, y = _HeadInLoss(), torch.randn(B, 5), _seq[1]()
    head_loss = lambda h, t: F.cross_entropy(model.head(h), t)  # noqa: E731
    expected = _exact_sq_norms(nn.Sequential(model.body, model.head), nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(_norms(model, head_loss, x, y), expected, rtol=1e-5, atol=0)
    dl = DataLoader(TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,))), batch_size=8)
    penalised = lambda h, t: head_loss(h, t) + 1e-4 * model.head.weight.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="'head.weight' after the batch was reduced.*weight_decay"):
        bs_find(model, dl, penalised, lr=0, num_it=5, method="per_example")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_tiny_gpt_noise_scale_within_10_percent_of_exact():
    "The nanoGPT-style model end to end: bs_find(method='per_example', lr=0) against all 20k per-example gradients."
    torch.manual_seed(0)
    model, (x, y) = TinyGPT(), markov_tokens(20_000)
    tr_sigma, g_sq = _exact_noise_scale(model, next_token_loss, x, y)  # the tied lm_head counts once, as wte
    dl = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2))
    res = bs_find(model, dl, next_token_loss, lr=0, num_it=300, beta=0.99, device="cpu", method="per_example")
    assert res.noise_scale == pytest.approx(tr_sigma / g_sq, rel=0.10)
    assert res.history.noise.iloc[-1] == pytest.approx(tr_sigma, rel=0.10)
    assert res.history.scale.iloc[-1] == pytest.approx(g_sq, rel=0.10)


def test_frozen_first_layer_noise_scale_within_10_percent_of_exact():
    from tests.test_exactness import _mlp_problem

    model, loss_func, x, y = _mlp_problem()
    model[0].requires_grad_(False)
    tr_sigma, g_sq = _exact_noise_scale(model, loss_func, x, y)
    exact = tr_sigma / g_sq
    dl = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(2))
    res = bs_find(model, dl, loss_func, lr=0, num_it=1000, beta=0.99, device="cpu", method="per_example")
    assert res.noise_scale == pytest.approx(exact, rel=0.10)


class _Custom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class _Net(nn.Module):
    "A Linear layer fed by whatever `body` does to the input."

    def __init__(self, body, **layers):
        super().__init__()
        self.body, self.fc = body, nn.Linear(4, 4)
        for k, v in layers.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fc(self.body(self, x))


def _refused(name):
    cases = {
        "merged-batch": (lambda m, x: m.fc(x.reshape(-1, 2)).reshape(x.shape[0], -1)[:, :4], {}, "batch dimension"),
        "custom-function": (lambda m, x: _Custom.apply(x, m.w), {"w": nn.Parameter(torch.ones(4))},
                            "gradients disabled"),
        "no-grad-use": (lambda m, x: x + _no_grad_copy(m.w), {"w": nn.Parameter(torch.ones(4))}, "gradients disabled"),
        "reduced-over-batch": (lambda m, x: x * (x * m.w).mean(0), {"w": nn.Parameter(torch.ones(4))},
                               "without the batch dimension|batch dimension was lost"),
        "scale-grad-by-freq": (lambda m, x: m.emb((x > 0).long()).sum(1),
                               {"emb": nn.Embedding(2, 4, scale_grad_by_freq=True)}, "scale_grad_by_freq"),
        "lstm-proj": (lambda m, x: m.rnn(x.unsqueeze(1))[0][:, 0],
                      {"rnn": nn.LSTM(4, 4, proj_size=2, batch_first=True)}, "proj_size"),
        "lstm-dropout": (lambda m, x: m.rnn(x.unsqueeze(1))[0][:, 0],
                         {"rnn": nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True)}, "dropout"),
        "packed-sequence": (lambda m, x: nn.utils.rnn.pad_packed_sequence(m.rnn(nn.utils.rnn.pack_padded_sequence(
            x.unsqueeze(1), torch.ones(len(x), dtype=torch.long), batch_first=True))[0], batch_first=True)[0][:, 0],
            {"rnn": nn.LSTM(4, 4, batch_first=True)}, "PackedSequence"),
        "attention-dropout": (lambda m, x: m.mha(x.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1), need_weights=False)[
            0][:, 0], {"mha": nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)}, "random"),
        "batchnorm": (lambda m, x: m.bn(x), {"bn": nn.BatchNorm1d(4)}, "BatchNorm1d in training mode"),
        "gradient-hook": (lambda m, x: m.lin(x), {"lin": _grad_hooked(nn.Linear(4, 4))},
                          "'lin.weight' has a gradient hook"),
    }
    body, layers, match = cases[name]
    return (lambda: _Net(body, **layers)), match


def _grad_hooked(layer: nn.Linear) -> nn.Linear:
    "A gradient mask (train some rows only, as when fine-tuning new tokens): p.grad changes, per-example norms not."
    layer.weight.register_hook(lambda g: g * torch.tensor([1.0, 1.0, 0.0, 0.0]).unsqueeze(1))
    return layer


def _no_grad_copy(w):
    with torch.no_grad():
        return w * 2


class _ParamOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.temperature = nn.Linear(4, 4), nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc(x), self.temperature.exp()


REFUSED = ["merged-batch", "custom-function", "no-grad-use", "reduced-over-batch", "scale-grad-by-freq", "lstm-proj",
           "lstm-dropout", "packed-sequence", "attention-dropout", "batchnorm", "gradient-hook"]


@pytest.mark.parametrize("name", REFUSED)
def test_refuses_what_it_cannot_measure_exactly(name):
    make, match = _refused(name)
    torch.manual_seed(0)
    model = make()
    dl = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 4)), batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        bs_find(model, dl, nn.MSELoss(), lr=0.1, method="per_example", device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_refuses_an_output_computed_from_parameters_alone():
    dl = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 4)), batch_size=8)
    with pytest.raises(ValueError, match="'temperature'.* not on its input"):
        bs_find(_ParamOutput(), dl, lambda out, y: F.mse_loss(out[0] * out[1], y), lr=0, method="per_example",
                device="cpu")


def test_measuring_only_the_normalisation_layers_equals_freezing_the_rest():
    "The opt-in subset (Gray et al. 2024): exactly the norms of those parameters, the rest counted as frozen."
    torch.manual_seed(0)
    model, (x, y) = TinyGPT(), markov_tokens(B, seed=3)
    ln = norm_layer_params(model)
    assert len(ln) == 6  # ln_1, ln_2, ln_f: weight and bias
    with PerExampleNorms(model, ln) as norms:
        next_token_loss(model(x), y).backward()
        got = norms.pop().double()
    assert norms.params == ln
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in ln))
    torch.testing.assert_close(got, _exact_sq_norms(model, next_token_loss, x, y), rtol=1e-5, atol=0)
