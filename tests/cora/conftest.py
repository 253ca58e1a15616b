import pytest
import torch

from cora.generator import GeneratorConfig
from cora.llm import LLMConfig, load_llm, load_tokenizer, resolve_answer_token

SMALL_GEN = GeneratorConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.0)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def yes_id(tokenizer):
    return resolve_answer_token(tokenizer)


def tiny(name: str = "tiny-llama", seed: int = 0):
    model, _ = load_llm(LLMConfig(name=name, seed=seed))
    return model


def randomise_p(model, seed: int = 1, std: float = 0.5):
    """Give every P a non-zero value so the injected path has an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.injection.modules:
            m.lora_P.copy_(torch.randn(m.lora_P.shape, generator=g) * std)
