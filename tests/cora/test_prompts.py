import pytest

from cora.prompts import PromptEncoder, PromptTemplate, get_template, load_templates

MOVIE = ('#Question: A user has given high ratings to the following movies: "A", "B". Leverage the '
         'information to predict whether the user would enjoy the movie titled "T"? Answer with "Yes" '
         'or "No". \n#Answer:')


def test_movie_template_is_the_papers_text():
    assert get_template("movies").render(["A", "B"], "T") == MOVIE
    books = get_template("books").render(["A"], "T")
    assert "following books:" in books and 'the book titled "T"' in books
    assert set(load_templates()) >= {"movies", "books", "items"}


def test_unknown_domain_and_bad_template_file(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt domain 'games'.*books, collm-books, collm-items, collm-movies, items, laser-books, laser-items, laser-movies, movies"):
        get_template("games")
    bad = tmp_path / "t.json"
    bad.write_text('{"x": {"template": "no placeholders"}}')
    with pytest.raises(ValueError, match="lacks the placeholder {history}"):
        load_templates(bad)


def test_keeps_the_most_recent_titles(tokenizer):
    enc = PromptEncoder(tokenizer, get_template("movies"), max_history=2, max_length=512)
    text = tokenizer.decode(enc.encode(["Old", "Mid", "New"], "T"))
    assert '"Mid", "New"' in text and "Old" not in text


def test_truncation_drops_oldest_titles_first_and_keeps_question(tokenizer):
    titles = [f"Movie Number {i}" for i in range(10)]
    full = PromptEncoder(tokenizer, get_template("movies"), max_length=1000).encode(titles, "Target Film")
    limit = len(full) - 8
    enc = PromptEncoder(tokenizer, get_template("movies"), max_length=limit)
    ids = enc.encode(titles, "Target Film")
    text = tokenizer.decode(ids)
    assert len(ids) <= limit
    assert "Movie Number 0" not in text and "Movie Number 9" in text
    assert 'the movie titled "Target Film"' in text and text.endswith("#Answer:")
    kept = [t for t in titles if f'"{t}"' in text]
    assert kept == titles[len(titles) - len(kept):]          # a suffix: the newest ones


def test_answer_position_is_last_token(tokenizer):
    ids = PromptEncoder(tokenizer, get_template("items"), max_length=256).encode(["A"], "B")
    assert tokenizer.decode(ids[-1:]) == ":" or tokenizer.decode(ids[-2:]).endswith("Answer:")
    assert tokenizer.decode(ids).endswith("#Answer:")


def test_too_long_even_without_history(tokenizer):
    enc = PromptEncoder(tokenizer, PromptTemplate("Q {history} {target} A:"), max_length=5)
    with pytest.raises(ValueError, match="without any history is .* tokens, over max_length=5"):
        enc.encode(["x"], "a very long target title that cannot fit")


@pytest.mark.parametrize("domain", ["movies", "books", "items"])
def test_text_templates_tokenise_as_one_text_and_slot_templates_mark_their_slots(domain):
    """Encoding piece by piece (for CoLLM's slots) leaves the text-only prompts exactly as before: the
    whole rendered text tokenised at once. A slot template puts one slot token at each slot."""
    from cora.llm import load_tokenizer
    from cora.prompts import PromptEncoder, get_template
    tok = load_tokenizer("smollm2")
    history, target = ["Heat (1995)", "Up, and Away"], 'Say "Anything" (1989)'
    text = PromptEncoder(tok, get_template(domain))
    ids, slots = text.encode_with_slots(history, target)
    assert slots == [] and ids == text.prefix + tok(get_template(domain).render(history, target),
                                                   add_special_tokens=False).input_ids
    slotted = PromptEncoder(tok, get_template(f"collm-{domain}"))
    ids, slots = slotted.encode_with_slots(history, target)
    assert len(slots) == 2 and slots[0] < slots[1] and [ids[s] for s in slots] == [slotted.slot_token] * 2
    before_target = tok.decode(ids[slots[0] + 1:slots[1]])
    assert '"Say "Anything" (1989)" with the feature' in before_target
