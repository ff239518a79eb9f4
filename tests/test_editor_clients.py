"""The editor request builders alone (tests/editor_clients.py), no server: each computes what
its client's source computes, on cases worked out by hand from that source."""

from __future__ import annotations

import json

import pytest

from tests.editor_clients import (
    CONTINUE_COMMON_STOP,
    CONTINUE_QWEN_STOP,
    LLAMA_VIM_RESPONSE_FIELDS,
    LLAMA_VSCODE_DEFAULT_AI_MODEL,
    Chunk,
    Snippet,
    continue_llamacpp_autocomplete,
    continue_openai_autocomplete,
    continue_qwen_prompt,
    continue_uses_qwen_template,
    llama_vim_accepts_response,
    llama_vim_fim,
    llama_vim_local_context,
    llama_vim_ring_update,
    llama_vscode_fim,
    llama_vscode_local_context,
    llama_vscode_openai_completion,
    llama_vscode_suggestions,
    llama_vscode_warmup,
    tabby_openai_completion,
    tabby_read_stream,
    tabby_vllm_completion,
)

BUFFER = [
    "import os",
    "",
    "def main() -> None:",
    "    path = os.getcwd()",
    "    print(path)",
    "",
    "main()",
]
WHOLE = "\n".join(BUFFER) + "\n"
RING = (Chunk(("def helper():", "    return 1"), "lib/helper.py", 17),)


# -- llama.vim ------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [3, 4, 5])
def test_llama_vim_prefix_middle_and_suffix_reassemble_the_buffer(line: int) -> None:
    """Away from the first and last lines, and on a line that is not blank (a blank line's
    whitespace is dropped), the three parts are the buffer cut at the cursor, at every
    column."""
    text = BUFFER[line - 1]
    for col in range(len(text.encode()) + 1):
        ctx = llama_vim_local_context(BUFFER, line, col)
        assert ctx.prefix + ctx.middle + ctx.suffix == WHOLE
        assert ctx.prefix == "\n".join(BUFFER[: line - 1]) + "\n"
        assert ctx.middle == text[:col]


def test_llama_vim_first_and_last_lines_add_a_newline() -> None:
    """getline(1, 0) is empty, so the prefix at line 1 is a lone newline; at the last line the
    suffix is the line's rest, a newline, nothing, and a newline."""
    first = llama_vim_local_context(BUFFER, 1, 3)
    assert (first.prefix, first.middle) == ("\n", "imp")
    last = llama_vim_local_context(BUFFER, len(BUFFER), 4)
    assert (last.middle, last.suffix) == ("main", "()\n\n")


def test_llama_vim_window_is_n_prefix_and_n_suffix_lines() -> None:
    ctx = llama_vim_local_context(BUFFER, 4, 8, n_prefix=2, n_suffix=1)
    assert ctx.prefix == "\ndef main() -> None:\n"
    assert ctx.middle == "    path"
    assert ctx.suffix == " = os.getcwd()\n    print(path)\n"


def test_llama_vim_blank_line_drops_its_whitespace() -> None:
    lines = ["if x:", "        ", "pass"]
    ctx = llama_vim_local_context(lines, 2, 4)
    assert (ctx.middle, ctx.indent) == ("", 0)
    assert ctx.suffix == "\npass\n"


def test_llama_vim_indent_counts_a_tab_as_one() -> None:
    """s:fim_ctx_local counts the leading spaces and tabs (strlen of the match), not columns."""
    assert llama_vim_local_context(["\t  x = 1"], 1, 3).indent == 3
    assert llama_vim_local_context(["    return x"], 1, 6).indent == 4


def test_llama_vim_column_is_a_byte_offset() -> None:
    """col('.') - 1 counts bytes: after "hé" the column is 3."""
    ctx = llama_vim_local_context(["s = 'héllo'"], 1, len("s = 'hé".encode()))
    assert ctx.middle == "s = 'hé"
    assert ctx.suffix.startswith("llo'")


def test_llama_vim_speculative_context_is_as_if_the_suggestion_were_accepted() -> None:
    lines = ["def f():", "    ret", "x = 1"]
    one = llama_vim_local_context(lines, 2, 7, prev=["urn 1"], indent_last=4)
    assert (one.prefix, one.middle, one.suffix, one.indent) == (
        "def f():\n",
        "    return 1",
        "\nx = 1\n",
        4,
    )
    many = llama_vim_local_context(lines, 2, 7, prev=["urn (", "        1,", "    )"])
    assert many.prefix == "def f():\n    return (\n        1,\n"
    assert many.middle == "    )"


def test_llama_vim_fim_request() -> None:
    request = llama_vim_fim(BUFFER, 4, 8, ring=RING)
    body = request.body
    assert request.path == "/infill"
    assert body["input_prefix"] + body["prompt"] + body["input_suffix"] == WHOLE
    assert body["n_indent"] == 4
    assert body["input_extra"] == [
        {"text": "def helper():\n    return 1\n", "time": [17, 0], "filename": "lib/helper.py"}
    ]
    assert (body["n_predict"], body["top_k"], body["top_p"]) == (128, 40, 0.90)
    assert body["samplers"] == ["top_k", "top_p", "infill"]
    assert (body["stream"], body["cache_prompt"], body["id_slot"]) == (False, True, 0)
    assert body["response_fields"] == list(LLAMA_VIM_RESPONSE_FIELDS)
    assert body["t_max_prompt_ms"] == 500
    assert body["stop"] == []


def test_llama_vim_first_request_gets_250_ms_and_the_speculative_one_the_setting() -> None:
    assert llama_vim_fim(BUFFER, 4, 8).body["t_max_predict_ms"] == 250
    speculative = llama_vim_fim(BUFFER, 4, 8, prev=["()"], indent_last=4)
    assert speculative.body["t_max_predict_ms"] == 1000


def test_llama_vim_always_sends_model_and_authorization() -> None:
    """Its guards test the length of the option's name, not of its value."""
    request = llama_vim_fim(BUFFER, 4, 8)
    assert request.body["model"] == ""
    assert request.headers["Authorization"] == "Bearer "
    keyed = llama_vim_ring_update(RING, api_key="k", model_fim="qwen3-coder")
    assert keyed.headers["Authorization"] == "Bearer k"
    assert keyed.body["model"] == "qwen3-coder"


def test_llama_vim_ring_update_decodes_only_the_chunks() -> None:
    body = llama_vim_ring_update(RING).body
    assert (body["input_prefix"], body["input_suffix"], body["prompt"]) == ("", "", "")
    assert (body["n_predict"], body["samplers"], body["response_fields"]) == (0, [], [""])
    assert (body["t_max_prompt_ms"], body["t_max_predict_ms"]) == (1, 1)
    assert body["temperature"] == 0.0
    assert [c["text"] for c in body["input_extra"]] == [RING[0].text]


def test_llama_vim_accepts_only_compact_json_with_a_string_content() -> None:
    assert llama_vim_accepts_response(json.dumps({"content": "x"}, separators=(",", ":")))
    assert llama_vim_accepts_response('{"content" :"x","tokens_cached":3}')
    assert not llama_vim_accepts_response(json.dumps({"content": "x"}))  # ": " after the key
    assert not llama_vim_accepts_response('[{"content":"x"}]')
    assert not llama_vim_accepts_response('{"content":"x"')
    assert not llama_vim_accepts_response("")


# -- llama.vscode ---------------------------------------------------------------------------


def test_llama_vscode_context_matches_llama_vim_on_a_plain_line() -> None:
    for line in (2, 3, 4):
        vim = llama_vim_local_context(BUFFER, line + 1, 5)
        code = llama_vscode_local_context(BUFFER, line, 5)
        assert (code.input_prefix, code.prompt, code.input_suffix) == (
            vim.prefix,
            vim.middle,
            vim.suffix,
        )


def test_llama_vscode_blank_prefix_keeps_the_rest_of_the_line() -> None:
    ctx = llama_vscode_local_context(["x", "    y = 1"], 1, 4)
    assert (ctx.prompt, ctx.nindent) == ("", 4)
    assert ctx.input_suffix == "y = 1\n\n"


def test_llama_vscode_character_counts_utf16_units() -> None:
    """An emoji is two UTF-16 code units: the cursor after it is at character 3."""
    ctx = llama_vscode_local_context(["a😀b"], 0, 3)
    assert ctx.prompt == "a😀"
    assert ctx.input_suffix == "b\n\n"


def test_llama_vscode_fim_request() -> None:
    request = llama_vscode_fim(BUFFER, 3, 8, chunks=RING)
    body = request.body
    assert request.path == "/infill"
    assert request.headers == {}
    assert body["input_prefix"] + body["prompt"] + body["input_suffix"] == WHOLE
    assert body["n_cmpl"] == 3
    assert body["n_indent"] == 4
    assert (body["top_k"], body["top_p"], body["stream"]) == (40, 0.99, False)
    assert (body["t_max_prompt_ms"], body["t_max_predict_ms"]) == (500, 500)
    assert body["model"] == LLAMA_VSCODE_DEFAULT_AI_MODEL
    assert body["input_extra"] == [
        {"text": "def helper():\n    return 1\n", "time": 17, "filename": "lib/helper.py"}
    ]
    assert "response_fields" not in body


def test_llama_vscode_leaves_out_n_indent_at_zero_and_a_blank_model() -> None:
    body = llama_vscode_fim(BUFFER, 0, 3, ai_model=" ").body
    assert "n_indent" not in body
    assert "model" not in body
    keyed = llama_vscode_fim(BUFFER, 0, 3, api_key=" k ")
    assert keyed.headers["Authorization"] == "Bearer k"


def test_llama_vscode_warmup_shape() -> None:
    body = llama_vscode_warmup(RING).body
    assert (body["n_predict"], body["samplers"], body["t_max_predict_ms"]) == (0, [], 1)
    assert body["t_max_prompt_ms"] == 500
    assert (body["input_prefix"], body["input_suffix"], body["prompt"]) == ("", "", "")
    assert not {"model", "stream", "response_fields", "n_cmpl"} & body.keys()


def test_llama_vscode_reads_one_object_or_an_array_of_completions() -> None:
    assert llama_vscode_suggestions({"content": "x"}) == ["x"]
    assert llama_vscode_suggestions([{"content": "a"}, {"content": "b"}, {"content": "a"}]) == [
        "a",
        "b",
    ]
    assert llama_vscode_suggestions({"error": {}}) == []


def test_llama_vscode_openai_mode_cuts_characters() -> None:
    request = llama_vscode_openai_completion(BUFFER, 3, 8, chunks=RING, n_prefix=10, n_suffix=5)
    assert request.path == "/v1/completions"
    assert request.body["prompt"] == (
        "Context:\n\n[object Object]"
        "<|fim_prefix|> -> None:\n    path<|fim_suffix|> = os<|fim_middle|>"
    )
    assert request.headers["Authorization"] == "Bearer empty"
    assert (request.body["stream"], request.body["max_tokens"]) == (False, 128)


# -- Continue -------------------------------------------------------------------------------


def test_continue_picks_the_qwen_template_by_name() -> None:
    assert continue_uses_qwen_template("Qwen3-Coder-30B-A3B-Instruct")
    assert continue_uses_qwen_template("qwen3-coder")
    assert not continue_uses_qwen_template("qwen3")


def test_continue_qwen_prompt_without_and_with_other_files() -> None:
    assert continue_qwen_prompt("a", "b", filepath="x.py") == (
        "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
    )
    prompt = continue_qwen_prompt(
        "def f():\n    ",
        "\n",
        filepath="src/x.py",
        snippets=[Snippet("src/y.py", "Y = 1"), Snippet("z.py", "Z = 2\n")],
        reponame="proj",
    )
    assert prompt == (
        "<|repo_name|>proj\n"
        "<|file_sep|>src/y.py\nY = 1\n"
        "<|file_sep|>z.py\nZ = 2\n\n"
        "<|file_sep|>src/x.py\n"
        "<|fim_prefix|>def f():\n    <|fim_suffix|>\n<|fim_middle|>"
    )


def test_continue_openai_request() -> None:
    request = continue_openai_autocomplete("x = ", "", model="qwen3-coder", filepath="a.py")
    assert request.path == "/v1/completions"
    assert list(request.body) == ["model", "max_tokens", "temperature", "stream", "stop", "prompt"]
    assert request.body["prompt"] == "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>"
    assert request.body["stop"] == [*CONTINUE_QWEN_STOP, *CONTINUE_COMMON_STOP]
    assert len(request.body["stop"]) == 12
    assert (request.body["stream"], request.body["max_tokens"]) == (True, 4096)
    assert request.body["temperature"] == 0.01
    assert "suffix" not in request.body
    assert request.headers == {"Content-Type": "application/json", "api-key": ""}


def test_continue_llamacpp_request_goes_to_completion() -> None:
    request = continue_llamacpp_autocomplete("x", "y", model="qwen3-coder", filepath="a.py")
    assert request.path == "/completion"
    assert request.headers["Authorization"] == "Bearer undefined"
    assert request.body["n_predict"] == 4096


def test_continue_refuses_a_model_name_it_would_not_prompt_as_qwen() -> None:
    with pytest.raises(ValueError, match="Qwen FIM template"):
        continue_openai_autocomplete("x", "y", model="qwen3", filepath="a.py")


# -- Tabby ----------------------------------------------------------------------------------


def test_tabby_openai_completion_splits_prompt_and_suffix() -> None:
    request = tabby_openai_completion("def f():\n    ", "\nf()\n", model_name="qwen3-coder")
    assert request.path == "/v1/completions"
    assert request.body == {
        "model": "qwen3-coder",
        "prompt": "def f():\n    ",
        "suffix": "\nf()\n",
        "max_tokens": 64,
        "temperature": 0.1,
        "stream": True,
        "presence_penalty": 0.0,
    }
    assert request.headers == {}
    assert tabby_openai_completion("x", "", model_name="m").body["suffix"] == "\n"


def test_tabby_puts_snippets_above_the_prefix_as_comments() -> None:
    body = tabby_openai_completion(
        "x = ",
        "\n",
        model_name="m",
        snippets=[Snippet("a.py", "A = 1\n\nB = 2\n"), Snippet("b.py", "C = 3")],
    ).body
    assert body["prompt"] == "# Path: a.py\n# A = 1\n#\n# B = 2\n#\n# Path: b.py\n# C = 3\nx = "


def test_tabby_cuts_the_prompt_to_its_last_bytes() -> None:
    """1536 bytes are kept from the end of prefix + marker + suffix: a long prefix loses its
    start; a suffix that long loses the marker, and the suffix field is null."""
    body = tabby_openai_completion("p" * 2000, "s" * 10, model_name="m").body
    assert (len(body["prompt"]), body["suffix"]) == (1536 - len("<|FIM|>") - 10, "s" * 10)
    body = tabby_openai_completion("p", "é" * 1000, model_name="m").body
    assert (body["prompt"], body["suffix"]) == ("é" * 768, None)


def test_tabby_vllm_kind_renders_the_template_and_sends_a_null_suffix() -> None:
    body = tabby_vllm_completion(
        "a",
        "b",
        model_name="m",
        prompt_template="<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
    ).body
    assert body["prompt"] == "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
    assert body["suffix"] is None


def test_tabby_reads_until_a_finish_reason() -> None:
    chunks = [
        {"choices": [{"text": "a", "finish_reason": None}]},
        {"choices": [{"text": "b", "finish_reason": "stop"}]},
    ]
    payloads = [json.dumps(c) for c in chunks]
    assert tabby_read_stream([*payloads, "[DONE]"]) == "ab"
    with pytest.raises(ValueError):
        tabby_read_stream([payloads[0], "[DONE]"])
    with pytest.raises(ValueError):
        tabby_read_stream([json.dumps({"error": {"message": "x"}})])
