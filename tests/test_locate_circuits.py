import numpy as np
import pytest
import torch

from excise.locate.circuits import circuit_faithfulness, edge_attribution_patching, run_circuit
from excise.locate.metric import make_fact_batch, run_metric
from excise.locate.planted import planted_model
from excise.locate.reference import fact_texts
from excise.plots.circuits import plot_circuit, plot_faithfulness
from tests.helpers import toy_domain, toy_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from more threads, and on a busy machine several threads per process thrash.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.fixture(scope="module")
def circuit(model):
    return edge_attribution_patching(model, toy_domain(), reference="mean")


def test_graph_shape_with_grouped_query_attention(model, circuit):
    # 1 embedding + 2 layers x (4 heads + MLP); readers per layer: 4 queries, 2 keys, 2 values, MLP; then logits.
    assert len(circuit.upstream) == 11
    assert len(circuit.downstream) == 2 * 9 + 1
    assert "L1.KV1.v" in circuit.downstream
    assert "L1.H3.q" in circuit.downstream
    allowed = dict(zip(circuit.upstream, circuit.allowed.tolist(), strict=True))
    index = {name: i for i, name in enumerate(circuit.downstream)}
    assert allowed["L0.H1"][index["L0.MLP"]]  # a head feeds its own layer's MLP
    assert not allowed["L0.H1"][index["L0.H2.q"]]  # but not heads of its own layer
    assert not allowed["L1.MLP"][index["L1.MLP"]]
    assert all(allowed["embed"])
    assert not model.cfg.use_split_qkv_input  # restored after scoring
    assert not model.cfg.use_hook_mlp_in


def test_full_circuit_is_the_model(model, circuit):
    domain = toy_domain()
    values = run_circuit(circuit, model, domain, circuit.allowed)
    with torch.no_grad():
        clean = run_metric(model, make_fact_batch(model, domain.forget), "target_logprob")
    torch.testing.assert_close(values, clean, atol=1e-5, rtol=0)


@pytest.mark.parametrize("node", ["L0.H2", "L0.MLP", "L1.H0"])
def test_cut_node_edges_equal_node_ablation(model, circuit, node):
    domain = toy_domain()
    keep = circuit.allowed.clone()
    keep[circuit.upstream.index(node)] = False
    pruned = run_circuit(circuit, model, domain, keep)
    # The same ablation as a hook on the node's output, at its mean over the facts' texts.
    from excise.edit import ablate
    from excise.sites import Site

    layer, part = node.split(".")
    texts = fact_texts(domain.forget)
    if part == "MLP":
        from excise.edit.ablation import mean_activations

        name = f"blocks.{layer[1:]}.hook_mlp_out"
        mean = mean_activations(model, [name], texts)[name]
        hooks = [(name, lambda activation, hook: mean.expand_as(activation).clone())]
        with model.hooks(fwd_hooks=hooks), torch.no_grad():
            expected = run_metric(model, make_fact_batch(model, domain.forget), "target_logprob")
    else:
        edit = ablate(model, [Site.head(int(layer[1:]), int(part[1:]))], "mean", reference=texts)
        with edit.hooks(model), torch.no_grad():
            expected = run_metric(model, make_fact_batch(model, domain.forget), "target_logprob")
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


def _single_edge_effects(model, circuit, edges):
    domain = toy_domain()
    base = run_circuit(circuit, model, domain, circuit.allowed).mean()
    measured = []
    for u, d in edges:
        keep = circuit.allowed.clone()
        keep[u, d] = False
        measured.append(float(base - run_circuit(circuit, model, domain, keep).mean()))
    return np.array(measured)


def test_eap_ig_beats_eap_on_edge_ablation(model, circuit):
    # Edges that carry a whole normalised input (the embedding into layer 0) are where the linear estimate fails:
    # RMSNorm's gradient is orthogonal to its input. Integrating along the path recovers them.
    ig = edge_attribution_patching(model, toy_domain(), method="eap-ig", steps=8, reference="mean")
    assert ig.settings["steps"] == 8
    edges = torch.nonzero(circuit.allowed).tolist()
    measured = _single_edge_effects(model, circuit, edges)
    eap = np.corrcoef([float(circuit.scores[u, d]) for u, d in edges], measured)[0, 1]
    eap_ig = np.corrcoef([float(ig.scores[u, d]) for u, d in edges], measured)[0, 1]
    assert eap_ig > 0.85
    assert eap_ig > eap + 0.2


def test_planted_neuron_edge_is_on_top():
    planted = planted_model("neuron", layer=0)
    circuit = edge_attribution_patching(planted.model, planted.domain, reference="mean")
    top = circuit.edges().iloc[0]
    assert (top["upstream"], top["downstream"]) == ("L0.MLP", "logits")


def test_planted_query_head_edge_is_on_top():
    planted = planted_model("head", layer=1, n_key_value_heads=2, head=3)
    circuit = edge_attribution_patching(planted.model, planted.domain, method="eap-ig", reference="mean")
    top = circuit.edges().iloc[0]
    assert (top["upstream"], top["downstream"]) == ("L1.H3", "logits")


def test_faithfulness_and_plots(model, circuit):
    frame = circuit_faithfulness(circuit, model, toy_domain(), n_edges=[0, 5, circuit.n_edges])
    assert frame["faithfulness"].iloc[0] == pytest.approx(0.0, abs=1e-6)
    assert frame["faithfulness"].iloc[-1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(plot_faithfulness(frame).data[0].y, frame["faithfulness"].to_numpy())
    figure = plot_circuit(circuit, n=6)
    assert len(figure.data) == 7  # six edges and the nodes
    names = set(figure.data[-1].text)
    assert {circuit.edges().iloc[0]["upstream"]} <= names


def test_bad_input(model, circuit):
    with pytest.raises(ValueError, match="method"):
        edge_attribution_patching(model, toy_domain(), method="acdc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="boolean mask"):
        run_circuit(circuit, model, toy_domain(), circuit.scores)
    with pytest.raises(ValueError, match="between 0"):
        circuit.top_edges(circuit.n_edges + 1)


def test_selectivity_subtracts_the_kept_circuit(model, circuit):
    kept = edge_attribution_patching(model, toy_domain(), which="retain", reference="mean")
    selective = circuit.selectivity(kept)
    torch.testing.assert_close(selective.scores, circuit.scores - kept.scores)
    assert selective.method == "eap (selectivity)"
    assert selective.settings["minus"]["reference"] == "mean"
