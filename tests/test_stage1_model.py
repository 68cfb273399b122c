"""Stage-1 graph, GNN and quantizer: invariants on tiny hand-made tensors (no dataset on disk)."""

import copy

import numpy as np
import pytest
import torch

from dppmg.errors import DppmgError
from stage1_preference.graph import (
    RECENCY_FLOOR,
    build_knn_graph,
    build_norm_adj,
    propagate,
    recency_weights,
    sparse_matmul,
    transpose_csr,
)
from stage1_preference.model import ID_BRANCH, ModalGNN, bpr_loss, pair_keys, sample_bpr, score, score_all
from stage1_preference.quantizer import PreferenceQuantizer, codebook_usage, unique_code_ratio

NU, NI, DIM = 12, 18, 8  # users, items, embedding width


@pytest.fixture
def edges() -> tuple[torch.Tensor, torch.Tensor]:
    """Random interactions with repeats; user NU-1 and item NI-1 have none."""
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, NU - 1, (60,), generator=g)
    items = torch.randint(0, NI - 1, (60,), generator=g)
    return torch.cat([users, users[:5]]), torch.cat([items, items[:5]])


@pytest.fixture
def features() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"text": torch.randn(NI, 16, generator=g), "image": torch.randn(NI, 6, generator=g) * 50 + 3}


def dense_reference_propagation(adj: torch.Tensor, x: torch.Tensor, layers: int) -> torch.Tensor:
    a, out, h = adj.to_dense(), x, x
    for _ in range(layers):
        h = a @ h
        out = out + h
    return out / (layers + 1)


# ---- graphs -------------------------------------------------------------------------------------------


def test_norm_adj_is_symmetric_normalised_bipartite(edges):
    users, items = edges
    adj = build_norm_adj(NU, NI, users, items)
    assert adj.layout == torch.sparse_csr and adj.dtype == torch.float32
    a = adj.to_dense()
    assert torch.equal(a, a.T)
    assert a[:NU, :NU].abs().sum() == 0 and a[NU:, NU:].abs().sum() == 0  # bipartite
    assert a[NU - 1].abs().sum() == 0 and a[NU + NI - 1].abs().sum() == 0  # isolated nodes: empty rows
    # Entry (u, NU+i) = 1 / sqrt(deg u · deg i) with repeats counted once.
    binary = torch.zeros(NU, NI)
    binary[users, items] = 1.0
    deg = torch.cat([binary.sum(1), binary.sum(0)])
    expected = binary / torch.sqrt(deg[:NU, None] * deg[None, NU:]).clamp_min(1e-12)
    torch.testing.assert_close(a[:NU, NU:], expected * binary)
    # sqrt(deg) is an eigenvector with eigenvalue 1, and no eigenvalue exceeds 1 in magnitude.
    torch.testing.assert_close(a @ deg.sqrt(), deg.sqrt())
    eig = torch.linalg.eigvalsh(a.double())
    assert eig.abs().max() <= 1 + 1e-5 and eig.max() >= 1 - 1e-5


def test_norm_adj_rejects_bad_indices():
    with pytest.raises(DppmgError, match="item_idx"):
        build_norm_adj(2, 3, torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(DppmgError, match="equal length"):
        build_norm_adj(2, 3, torch.tensor([0, 1]), torch.tensor([0]))


def test_weighted_norm_adj_normalises_by_weighted_degree(edges):
    users, items = edges
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(len(users), generator=g) + 0.1
    a = build_norm_adj(NU, NI, users, items, weights).to_dense()
    assert torch.equal(a, a.T)
    # A repeated (user, item) pair keeps its largest weight; entry = w / sqrt(weighted deg u · weighted deg i).
    w = torch.zeros(NU, NI)
    for u, i, x in zip(users.tolist(), items.tolist(), weights.tolist()):
        w[u, i] = max(w[u, i], x)
    deg = torch.cat([w.sum(1), w.sum(0)])
    expected = w / torch.sqrt(deg[:NU, None] * deg[None, NU:]).clamp_min(1e-12)
    torch.testing.assert_close(a[:NU, NU:], expected)
    eig = torch.linalg.eigvalsh(a.double())
    assert eig.abs().max() <= 1 + 1e-5
    # Equal weights are the binary graph.
    same = build_norm_adj(NU, NI, users, items, torch.full((len(users),), 3.0)).to_dense()
    torch.testing.assert_close(same, build_norm_adj(NU, NI, users, items).to_dense())
    for bad in (torch.zeros(len(users)), torch.ones(3), torch.full((len(users),), float("nan"))):
        with pytest.raises(DppmgError, match="edge weights"):
            build_norm_adj(NU, NI, users, items, bad)


def test_recency_weights_halve_every_halflife_back_in_each_history():
    # user 1's rows are out of time order in the arrays; user 0 has a tie at time 5 (array order decides).
    users = np.array([1, 0, 1, 0, 0, 1])
    times = np.array([30, 5, 10, 5, 1, 20])
    w = recency_weights(users, times, halflife=2.0)
    # user 0 in time order: rows 4 (t=1), 1 (t=5), 3 (t=5, later in the arrays): 2, 1, 0 steps from the end.
    # user 1: rows 2 (t=10), 5 (t=20), 0 (t=30).
    expected = np.empty(6)
    expected[[4, 1, 3]] = 0.5 ** (np.array([2, 1, 0]) / 2)
    expected[[2, 5, 0]] = 0.5 ** (np.array([2, 1, 0]) / 2)
    np.testing.assert_allclose(w, expected)
    long = recency_weights(np.zeros(200, dtype=np.int64), np.arange(200), halflife=1.0)
    assert long[-1] == 1.0 and long.min() == RECENCY_FLOOR  # no edge of a long history vanishes
    with pytest.raises(DppmgError, match="half-life"):
        recency_weights(users, times, halflife=0)


def test_knn_graph_links_each_item_to_its_nearest_others():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(3, 10, generator=g) * 10
    cluster = torch.arange(15) % 3
    feats = centres[cluster] + 0.1 * torch.randn(15, 10, generator=g)
    knn = build_knn_graph(feats, k=3)
    assert knn.layout == torch.sparse_csr and knn.shape == (15, 15)
    s = knn.to_dense()
    torch.testing.assert_close(s.sum(1), torch.ones(15))
    assert torch.equal((s > 0).sum(1), torch.full((15,), 3))
    assert s.diagonal().abs().sum() == 0
    rows, cols = s.nonzero().T
    assert torch.equal(cluster[rows], cluster[cols])  # 5 items per cluster: the 3 nearest are in it
    # k is capped at NI - 1: every other item, equally weighted.
    torch.testing.assert_close(build_knn_graph(feats[:4], k=10).to_dense(), (1 - torch.eye(4)) / 3)


def test_propagate_matches_dense_reference_in_value_and_gradient(edges):
    adj = build_norm_adj(NU, NI, *edges)
    x = torch.randn(NU + NI, DIM, requires_grad=True)
    weight = torch.randn(NU + NI, DIM)  # a non-uniform upstream gradient
    (propagate(adj, x, 3) * weight).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    reference = dense_reference_propagation(adj, x, 3)
    (reference * weight).sum().backward()
    torch.testing.assert_close(propagate(adj, x.detach(), 3), reference.detach())
    torch.testing.assert_close(grad, x.grad)


def test_sparse_matmul_gradient_uses_the_transpose():
    knn = build_knn_graph(torch.randn(10, 4), k=2)  # row-normalised: not symmetric
    x = torch.randn(10, DIM, requires_grad=True)
    weight = torch.randn(10, DIM)
    (sparse_matmul(knn, transpose_csr(knn), x) * weight).sum().backward()
    torch.testing.assert_close(x.grad, knn.to_dense().T @ weight)


# ---- the GNN --------------------------------------------------------------------------------------------


def test_forward_shapes_per_branch_and_id_branch_only_when_asked(edges, features):
    adj = build_norm_adj(NU, NI, *edges)
    model = ModalGNN(NU, NI, features, dim=DIM, layers=2)
    assert model.branches == ["text", "image"]
    emb = model(adj)
    assert set(emb.users) == set(emb.items) == {"text", "image"}
    assert all(v.shape == (NU, DIM) for v in emb.users.values())
    assert all(v.shape == (NI, DIM) for v in emb.items.values())
    with_id = ModalGNN(NU, NI, features, dim=DIM, layers=2, id_branch=True)
    assert with_id.branches == ["text", "image", ID_BRANCH]
    emb = with_id(adj)
    assert emb.users[ID_BRANCH].shape == (NU, DIM) and emb.items[ID_BRANCH].shape == (NI, DIM)
    l0 = with_id.layer0()
    assert set(l0.users) == set(l0.items) == {"text", "image", ID_BRANCH}
    id_only = ModalGNN(
        NU, NI, {}, dim=DIM, layers=2, id_branch=True
    )  # the benchmark's like-for-like LightGCN
    assert list(id_only(adj).users) == [ID_BRANCH]
    assert "branches=['text', 'image', 'id']" in repr(with_id)


def test_branch_output_is_the_lightgcn_layer_mean(edges, features):
    adj = build_norm_adj(NU, NI, *edges)
    model = ModalGNN(NU, NI, features, dim=DIM, layers=3)
    emb, l0 = model(adj), model.layer0()
    for b in model.branches:
        expected = dense_reference_propagation(adj, torch.cat([l0.users[b], l0.items[b]]), 3)
        torch.testing.assert_close(torch.cat([emb.users[b], emb.items[b]]), expected)


def test_knn_graph_mixes_in_the_item_item_propagation(edges, features):
    adj = build_norm_adj(NU, NI, *edges)
    knn = build_knn_graph(features["text"], k=4)
    torch.manual_seed(3)
    plain = ModalGNN(NU, NI, features, dim=DIM, layers=2)
    torch.manual_seed(3)
    mixed = ModalGNN(NU, NI, features, dim=DIM, layers=2, knn_graphs={"text": knn}, knn_weight=0.3)
    a, b, l0 = plain(adj), mixed(adj), mixed.layer0()
    expected = 0.7 * a.items["text"] + 0.3 * knn.to_dense() @ l0.items["text"]
    torch.testing.assert_close(b.items["text"], expected)
    torch.testing.assert_close(b.items["image"], a.items["image"])  # no graph for image
    torch.testing.assert_close(b.users["text"], a.users["text"])


def test_frozen_inputs_are_not_saved_and_the_model_deep_copies(edges, features):
    knn = {"text": build_knn_graph(features["text"], k=3)}
    model = ModalGNN(NU, NI, features, dim=DIM, knn_graphs=knn, item_id_embedding=False)
    assert not any(k.startswith(("features_", "knn_")) for k in model.state_dict())
    assert "text" not in model.item_id  # features only
    adj = build_norm_adj(NU, NI, *edges)
    torch.testing.assert_close(copy.deepcopy(model)(adj).items["text"], model(adj).items["text"])


def test_model_rejects_mismatched_inputs(features):
    with pytest.raises(DppmgError, match="expected \\[19, dim\\]"):
        ModalGNN(NU, NI + 1, features)
    with pytest.raises(DppmgError, match="at least one branch"):
        ModalGNN(NU, NI, {})
    with pytest.raises(DppmgError, match="another dataset"):
        ModalGNN(NU, NI, features)(build_norm_adj(NU + 1, NI, torch.tensor([0]), torch.tensor([0])))


def test_score_and_score_all_agree():
    g = torch.Generator().manual_seed(4)
    users = {b: torch.randn(5, DIM, generator=g) for b in ("text", "image")}
    items = {b: torch.randn(7, DIM, generator=g) for b in ("text", "image")}
    all_scores = score_all(users, items)
    assert all_scores.shape == (5, 7)
    picked = torch.tensor([6, 0, 3, 3, 1])
    torch.testing.assert_close(
        score(users, {b: v[picked] for b, v in items.items()}), all_scores[torch.arange(5), picked]
    )
    only_text = score_all({"text": users["text"]}, items)  # users' branches decide which ones count
    torch.testing.assert_close(only_text, users["text"] @ items["text"].T)


def test_sample_bpr_never_returns_a_train_positive_as_negative():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(30), 8)
    items = np.concatenate([rng.choice(10, 8, replace=False) for _ in range(30)])  # dense: 80% of items seen
    u, pos, neg = sample_bpr(users, items, 10, rng)
    assert u.dtype == pos.dtype == neg.dtype == torch.long and len(u) == len(users)
    assert torch.equal(u, torch.from_numpy(users)) and torch.equal(pos, torch.from_numpy(items))
    keys = set(pair_keys(users, items, 10).tolist())
    assert not any(int(a) * 10 + int(b) in keys for a, b in zip(u, neg))
    assert int(neg.min()) >= 0 and int(neg.max()) < 10
    # A shard of the positives with the whole train split's keys: still no train positive.
    _, _, neg = sample_bpr(users[:40], items[:40], 10, rng, train_sets=pair_keys(users, items, 10))
    assert not any(int(a) * 10 + int(b) in keys for a, b in zip(users[:40], neg))


def test_sample_bpr_rejects_a_user_with_every_item():
    with pytest.raises(DppmgError, match="user_idx 1 interacted with all 3 items"):
        sample_bpr(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 2]), 3, np.random.default_rng(0))


def test_bpr_steps_lower_the_loss_on_planted_preferences():
    """Users like one of three item categories, visible in the features; a few Adam steps must learn it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    num_users, num_items = 24, 36
    category = torch.arange(num_items) % 3
    feats = {"text": torch.eye(3)[category] + 0.1 * torch.randn(num_items, 3)}
    liked = [np.flatnonzero(category.numpy() == u % 3) for u in range(num_users)]
    users = np.repeat(np.arange(num_users), 5)
    items = np.concatenate([rng.choice(c, 5, replace=False) for c in liked])
    adj = build_norm_adj(num_users, num_items, torch.from_numpy(users), torch.from_numpy(items))
    model = ModalGNN(num_users, num_items, feats, dim=DIM, layers=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    fixed = sample_bpr(users, items, num_items, np.random.default_rng(1))

    def loss_on(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        emb = model(adj)
        user_vecs = {b: e[u] for b, e in emb.users.items()}
        pos_items, neg_items = ({b: e[idx] for b, e in emb.items.items()} for idx in (pos, neg))
        return bpr_loss(score(user_vecs, pos_items), score(user_vecs, neg_items))

    with torch.no_grad():
        before = float(loss_on(*fixed))
    for _ in range(40):
        loss = loss_on(*sample_bpr(users, items, num_items, rng))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_on(*fixed))
    assert before == pytest.approx(np.log(2), abs=0.05)  # small init: scores start near 0
    assert after < 0.7 * before


# ---- the quantizer ------------------------------------------------------------------------------------


@pytest.fixture
def trained_quantizer() -> tuple[PreferenceQuantizer, torch.Tensor]:
    torch.manual_seed(0)
    quantizer = PreferenceQuantizer(["text", "image"], dim=DIM, levels=3, codebook_size=8)
    x = torch.randn(64, DIM)
    quantizer.train()
    for m in quantizer.modalities:  # first call: k-means init on every vector, then a few EMA steps
        for _ in range(3):
            quantizer(m, x)
    return quantizer, x


def test_decode_reproduces_quantized_output_in_eval(trained_quantizer):
    quantizer, x = trained_quantizer
    quantizer.eval()
    out = quantizer("text", x)
    assert out.codes.shape == (64, 3) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 8
    torch.testing.assert_close(quantizer.decode("text", out.codes), out.quantized)
    books = quantizer.codebooks("text")
    assert books.shape == (3, 8, DIM)
    torch.testing.assert_close(out.quantized, sum(books[level][out.codes[:, level]] for level in range(3)))


def test_codebooks_do_not_change_in_eval_and_survive_a_state_dict(trained_quantizer):
    quantizer, x = trained_quantizer
    quantizer.eval()
    before = quantizer.codebooks("image").clone()
    quantizer("image", x * 3)
    torch.testing.assert_close(quantizer.codebooks("image"), before)
    restored = PreferenceQuantizer(["text", "image"], dim=DIM, levels=3, codebook_size=8)
    restored.load_state_dict(quantizer.state_dict())
    restored.eval()
    restored("image", x * 3)  # must not run k-means again on this "first" batch
    torch.testing.assert_close(restored.codebooks("image"), before)
    torch.testing.assert_close(restored("image", x).quantized, quantizer("image", x).quantized)


def test_kmeans_initialises_on_the_first_batch():
    torch.manual_seed(0)
    quantizer = PreferenceQuantizer(["text"], dim=DIM, levels=1, codebook_size=4)
    x = torch.randn(200, DIM) + 10.0  # far from the zero-initialised codebook
    quantizer.eval()
    quantizer("text", x)
    assert (quantizer.codebooks("text")[0].mean(1) - 10.0).abs().max() < 1.0


def test_gradients_flow_straight_through_to_the_input(trained_quantizer):
    quantizer, _ = trained_quantizer
    quantizer.train()
    x = torch.randn(16, DIM, requires_grad=True)
    weight = torch.randn(16, DIM)
    out = quantizer("text", x)
    (out.quantized * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight)  # d quantized / d x = NI
    x.grad = None
    out = quantizer("text", x)
    assert out.loss.dim() == 0 and out.loss.item() > 0
    out.loss.backward()  # the commitment loss pulls x towards its codes
    assert x.grad.abs().sum() > 0


def test_batch_metrics_describe_the_codes(trained_quantizer):
    quantizer, x = trained_quantizer
    quantizer.eval()
    out = quantizer("text", x)
    for level in range(3):
        counts = torch.bincount(out.codes[:, level], minlength=8).float()
        p = counts[counts > 0] / counts.sum()
        assert out.metrics[f"usage_l{level}"] == pytest.approx(float((counts > 0).float().mean()))
        assert out.metrics[f"perplexity_l{level}"] == pytest.approx(
            float(torch.exp(-(p * p.log()).sum())), rel=1e-5
        )
        assert 1.0 <= out.metrics[f"perplexity_l{level}"] <= 8.0


def test_quantizer_rejects_bad_inputs(trained_quantizer):
    quantizer, _ = trained_quantizer
    with pytest.raises(DppmgError, match="'audio'"):
        quantizer("audio", torch.randn(2, DIM))
    with pytest.raises(DppmgError, match=r"must lie in \[0, 8\)"):
        quantizer.decode("text", torch.tensor([[0, 1, 8]]))
    with pytest.raises(DppmgError, match="expected \\[N, 3\\]"):
        quantizer.decode("text", torch.tensor([[0, 1]]))


def test_codebook_usage_and_unique_code_ratio_on_hand_made_codes():
    codes = torch.tensor([[0, 1], [0, 1], [2, 1], [3, 0]])
    assert codebook_usage(codes, 4) == [0.75, 0.5]
    assert unique_code_ratio(codes) == 0.75
    assert unique_code_ratio(torch.tensor([[5, 5, 5]])) == 1.0
    with pytest.raises(DppmgError):
        unique_code_ratio(torch.zeros(0, 2, dtype=torch.long))


def test_users_sharing_tuple_counts_collisions():
    from dppmg.tokens import users_sharing_tuple

    codes = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 3], [3, 4], [5, 5]])
    assert users_sharing_tuple(codes) == 4  # rows 0, 1 share (1, 2); rows 2, 4 share (3, 4)
    assert users_sharing_tuple(torch.tensor([[0], [1], [2]])) == 0


def test_collision_index_makes_tuples_unique():
    from stage1_preference.quantizer import collision_index

    codes = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [3, 4], [5, 5]])
    rank = collision_index(codes)
    assert rank.tolist() == [0, 1, 0, 2, 1, 0]
    extended = torch.cat([codes, rank[:, None]], dim=1)
    assert len(torch.unique(extended, dim=0)) == len(codes)


def test_disambiguation_codebook_scale():
    from stage1_preference.quantizer import disambiguation_codebook

    books = torch.randn(3, 16, 8)
    extra = disambiguation_codebook(books, seed=1)
    assert extra.shape == (16, 8)
    assert torch.allclose(extra.norm(dim=-1), books[-1].norm(dim=-1).mean().expand(16), atol=1e-5)
    assert torch.equal(extra, disambiguation_codebook(books, seed=1))
