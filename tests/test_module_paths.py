"""Module paths in the report come from ``nn_module_stack`` whatever source prefix Dynamo
puts in front of them: a new spelling in a Dynamo or transformers release must not
collapse every layer into one (transformers 5.25 made ``self`` into ``L['args'][0]``)."""
import pytest
import torch.fx as fx

from llmopt.report import clean_module_path, layer_of

SPELLINGS = [
    ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("L['args'][0].model.layers[0].self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
    ("L['fn'].__self__.model.layers[3].mlp", "model.layers.3.mlp"),
    ("L['kwargs']['module'].model.layers[2]", "model.layers.2"),
    ("G['model'].layers[1].mlp", "layers.1.mlp"),
    ('L["self"].transformer.h[11].attn', "transformer.h.11.attn"),
    ("L['self']._modules['model']._modules['layers'][2]", "model.layers.2"),
    ("L['self']", ""),
    ("model.layers.0.mlp", "model.layers.0.mlp"),
    ("L__self___model", "model"),
    ("L_args_0_", ""),
]


@pytest.mark.parametrize("raw,clean", SPELLINGS)
def test_every_dynamo_source_prefix_is_stripped(raw, clean):
    assert clean_module_path(raw) == clean


def _node_with_stack(paths):
    g = fx.Graph()
    n = g.placeholder("x")
    n.meta["nn_module_stack"] = {f"k{i}": (p, object) for i, p in enumerate(paths)}
    return n


@pytest.mark.parametrize("root", ["L['self']", "L['args'][0]", "L['fn'].__self__"])
def test_layer_is_the_innermost_module_under_the_models_root(root):
    # transformers >= 5.2x runs apply_rotary_pos_emb as a module reached through a global;
    # the node still belongs to its attention layer.
    node = _node_with_stack([
        f"{root}.model", f"{root}.model.layers[4]", f"{root}.model.layers[4].self_attn",
        "G['__import_transformers_dot_models_dot_llama_dot_modeling_llama'].apply_rotary_pos_emb",
    ])
    assert layer_of(node) == "model.layers.4.self_attn"


def test_a_node_without_a_stack_has_no_layer():
    assert layer_of(_node_with_stack([])) == ""
