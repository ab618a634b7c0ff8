from kefu.retrieval.chunking import chunk_document


def test_short_document_is_one_chunk_with_its_identity():
    [c] = chunk_document("d1", "Lamp", "The L2 costs 129 yuan.", version=7)
    assert (c.doc_id, c.chunk_id, c.title, c.version, c.position) == ("d1", "d1#0", "Lamp", 7, 0)
    assert c.embed_text.startswith("Lamp\n")


def test_headings_start_new_chunks_and_name_them():
    text = "# Shipping\nWe ship in 2 days.\n# Returns\nReturns within 7 days."
    chunks = chunk_document("d", "Policy", text, 1)
    assert [(c.heading, c.text) for c in chunks] == [("Shipping", "We ship in 2 days."),
                                                     ("Returns", "Returns within 7 days.")]


def test_long_text_splits_at_sentences_with_overlap():
    sentences = [f"Sentence number {i} says something useful." for i in range(40)]
    chunks = chunk_document("d", "", " ".join(sentences), 1, max_chars=200)
    assert len(chunks) > 5
    assert all(len(c.text) <= 260 for c in chunks)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.text.split(". ")[-1].rstrip(".") in b.text  # the last sentence is repeated
    covered = " ".join(c.text for c in chunks)
    assert all(s in covered for s in sentences)


def test_chinese_text_splits_at_chinese_punctuation():
    text = "。".join(f"第{i}条规定内容比较长需要分块处理" for i in range(60)) + "。"
    chunks = chunk_document("zh", "规定", text, 1, max_chars=100)
    assert len(chunks) > 5 and all(c.text.endswith("。") for c in chunks)


def test_a_sentence_longer_than_a_chunk_is_cut():
    chunks = chunk_document("d", "", "x" * 1200, 1, max_chars=500)
    assert [len(c.text) for c in chunks] == [500, 500, 200]


def test_list_items_stay_lines_of_their_own():
    text = "Price: 499 yuan.\n\n## Specifications\n- Battery: 6 hours per charge\n- Weight: 4.8 g\n1. 长按 5 秒\n2. 松开"
    chunks = chunk_document("eb", "EB-20", text, 1)
    assert chunks[1].text == "- Battery: 6 hours per charge\n- Weight: 4.8 g\n1. 长按 5 秒\n2. 松开"
