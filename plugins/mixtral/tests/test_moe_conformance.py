"""The core conformance suite on tiny random Mixtral and Qwen2-MoE models, under every experts kernel."""

from __future__ import annotations

from moe_tiny import tiny_mixtral, tiny_qwen2_moe
from prunekit_mixtral import MoEAdapter

from prunekit_core.testing import AdapterConformance


class MoEConformance(AdapterConformance):
    adapter = MoEAdapter()
    capabilities = {"depth", "sublayers", "width", "experts"}
    #: the experts kernel the model runs; models reloaded in round trips switch to it too
    implementation = "grouped_mm"

    def configure_loaded(self, model):
        model.set_experts_implementation(self.implementation)
        return model


class TestMixtralEager(MoEConformance):
    implementation = "eager"

    def make_model(self):
        return tiny_mixtral(self.implementation)


class TestMixtralGroupedMM(MoEConformance):
    def make_model(self):
        return tiny_mixtral(self.implementation)


class TestMixtralBatchedMM(MoEConformance):
    implementation = "batched_mm"

    def make_model(self):
        return tiny_mixtral(self.implementation)


class TestMixtralTopK1SlidingWindow(MoEConformance):
    seq_len = 20  # longer than the window

    def make_model(self):
        return tiny_mixtral(self.implementation, num_experts_per_tok=1, sliding_window=8)


class TestQwen2MoeEager(MoEConformance):
    implementation = "eager"

    def make_model(self):
        return tiny_qwen2_moe(self.implementation)


class TestQwen2MoeGroupedMM(MoEConformance):
    """Renormalised top-k weights, and a dense MLP in layer 1 (``mlp_only_layers``)."""

    def make_model(self):
        return tiny_qwen2_moe(self.implementation, norm_topk_prob=True, mlp_only_layers=[1])


class TestQwen2MoeSparseStep(MoEConformance):
    """Every second layer sparse (``decoder_sparse_step=2``): block removal must keep each layer's kind."""

    implementation = "batched_mm"

    def make_model(self):
        return tiny_qwen2_moe(self.implementation, decoder_sparse_step=2)
