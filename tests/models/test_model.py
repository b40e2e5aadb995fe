"""The LRA model: shapes, padding invariance, pooling, pair tasks, and the LR schedules."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from cast.attention.vanilla import VanillaAttention
from cast.models import LRAClassifier
from cast.models.embedding import sinusoidal_table
from cast.models.heads import pool
from cast.options import OptionError


def make(**kw):
    torch.manual_seed(0)
    args = dict(attention=partial(VanillaAttention), vocab_size=20, num_classes=5, max_length=16,
                d_model=32, n_layers=2, n_heads=4, mlp_dim=64, dropout=0.0)
    return LRAClassifier(**(args | kw)).eval()


def batch(b=3, n=16, valid=(16, 9, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (b, n), generator=g)
    mask = torch.arange(n)[None] < torch.tensor(valid)[:, None]
    return {"input_ids": ids * mask, "mask": mask, "label": torch.zeros(b, dtype=torch.long)}


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "none"])
def test_logits_shape_and_padding_invariance(pooling, positions):
    model = make(pooling=pooling, positions=positions)
    b = batch()
    logits = model(b)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    other = dict(b)
    other["input_ids"] = torch.where(b["mask"], b["input_ids"], torch.randint(1, 20, b["input_ids"].shape))
    torch.testing.assert_close(model(other), logits)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("positions", ["sinusoidal", "sinusoidal2d", "learned"])
def test_a_compacted_batch_gives_the_logits_of_the_masked_one(pooling, positions):
    from tasks.base import compacted

    model = make(pooling=pooling, positions=positions)
    b = batch()
    g = torch.Generator().manual_seed(3)
    b["mask"] = torch.rand(b["mask"].shape, generator=g) < 0.5   # padding scattered, as black pixels
    b["mask"][:, 0] = True
    b["input_ids"] = b["input_ids"].clamp(min=1) * b["mask"]
    packed = compacted(b)
    assert packed["input_ids"].shape[1] < b["input_ids"].shape[1]
    torch.testing.assert_close(model(packed), model(b), rtol=1e-5, atol=1e-5)


def test_2d_positions_depend_on_row_and_column():
    from cast.models.embedding import grid_table

    table = grid_table(16, 8).view(4, 4, 8)
    assert torch.equal(table[1, 2, :4], table[1, 3, :4]), "first half: the row"
    assert torch.equal(table[1, 2, 4:], table[3, 2, 4:]), "second half: the column"
    assert not torch.equal(table[1, 2], table[2, 1])
    with pytest.raises(ValueError, match="square"):
        grid_table(15, 8)


def test_masked_mean_pool_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool(x, mask, "mean").item() == 2.0
    assert pool(x, mask, "cls").item() == 1.0


def test_max_pool_takes_the_largest_real_value_of_each_feature():
    x = torch.tensor([[[1.0, -5.0], [3.0, -7.0], [100.0, 50.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pool(x, mask, "max"), torch.tensor([[3.0, -5.0]]))


@pytest.mark.parametrize("features,width", [("full", 4), ("concat", 2)])
def test_pair_model_shares_the_encoder(features, width):
    model = make(pair=True, pair_features=features)
    assert model.head[0].in_features == 32 * width
    b = batch()
    b2 = batch(seed=1)
    pair = {**b, "input_ids_2": b2["input_ids"], "mask_2": b2["mask"]}
    logits = model(pair)
    assert logits.shape == (3, 5)
    u, v = model.encode(b["input_ids"], b["mask"]), model.encode(b2["input_ids"], b2["mask"])
    expected = model.head(torch.cat([u, v, u * v, u - v] if features == "full" else [u, v], -1))
    torch.testing.assert_close(logits, expected)


def test_too_long_input_says_what_to_raise():
    model = make(max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        model(batch(n=16))


def test_sinusoidal_table_values():
    table = sinusoidal_table(4, 6)
    assert table[0, 0] == 0 and table[0, 1] == 1
    assert math.isclose(table[3, 2].item(), math.sin(3 / 10_000 ** (2 / 6)), rel_tol=1e-5)


def test_token_and_position_scales_weigh_the_two_parts_of_a_token_vector():
    from cast.models.embedding import Embedding, grid_table

    ids = torch.tensor([[3, 1, 4, 1]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    torch.manual_seed(0)
    default = Embedding(8, 16, 4, "sinusoidal2d", cls=False)
    torch.manual_seed(0)
    transformer = Embedding(8, 16, 4, "sinusoidal2d", cls=False, token_scale=None)
    torch.manual_seed(0)
    weighed = Embedding(8, 16, 4, "sinusoidal2d", cls=False, token_scale=1.0, position_scale=3.0, position_base=100)
    tokens = weighed.tokens(ids)
    torch.testing.assert_close(default(ids, mask)[0], tokens + grid_table(4, 16))   # LRA's: scale 1, base 10,000
    torch.testing.assert_close(transformer(ids, mask)[0], tokens * 4.0 + grid_table(4, 16))   # sqrt(16)
    torch.testing.assert_close(weighed(ids, mask)[0], tokens + 3.0 * grid_table(4, 16, base=100))
    assert math.isclose(sinusoidal_table(4, 6, base=100)[3, 2].item(), math.sin(3 / 100 ** (2 / 6)), rel_tol=1e-5)


@pytest.mark.parametrize("option,value", [("token_scale", 0.0), ("position_scale", -1.0), ("position_base", 1.0)])
def test_bad_embedding_scales_name_the_option(option, value):
    with pytest.raises(OptionError, match=f"{option}={value!r} must be .*set model.{option} in configs/model/transformer.yaml"):
        make(**{option: value})
