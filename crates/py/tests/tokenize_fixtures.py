"""Tokenizer fixtures for kvroute's tokenization conformance tests.

Builds, with the Python `tokenizers` package, a small byte-level BPE trained on
multilingual text, and saves three model directories whose chat templates are written in
the styles of real models (ChatML/Qwen with tools and thinking, Llama 3 with BOS,
dates and tool JSON, Gemma/Mistral-like with list content and role checks). Then it
makes >= 200 requests (completions and chat: multi-turn, system prompts, non-ASCII,
tools, tool calls, multi-part content) and computes the reference token ids with
`transformers` (`AutoTokenizer`, `apply_chat_template`), preparing the conversation the
way vLLM 0.33's OpenAI server does (vllm/renderers/chat_utils/chat_message.py).

Run as a script to (re)write testdata/tokenize (model dirs + vectors.json) for the Rust
tests: `python crates/py/tests/tokenize_fixtures.py testdata/tokenize`.
"""

import json
import pathlib
import random
import sys

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Routing requests to the worker that already holds the prefix saves prefill time.",
    "def route(request):\n    return min(workers, key=lambda w: w.load)\n",
    "Le cache KV garde les clés et les valeurs des jetons déjà vus.",
    "Der Router wählt den Arbeiter mit dem längsten gemeinsamen Präfix.",
    "東京の天気は晴れです。明日は雨が降るでしょう。",
    "Привет, как дела? Всё хорошо, спасибо!",
    "emoji: 🚀 🔥 ✅ — naïve café, coöperate, “quotes”",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "You are a helpful assistant. Answer concisely and cite your sources.",
    "What is the capital of France? The capital of France is Paris.",
    "Summarize the following document in three bullet points.",
]

SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"],
    "gemma": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
}

# Qwen 2.5 / Qwen 3 style: tools listed with tojson in the system turn, tool calls with
# arguments as JSON, consecutive tool results grouped in one user turn, `enable_thinking`.
CHATML = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

# Llama 3.1 style: BOS from the template, a dated system header (strftime_now or the
# date_string kwarg), tools as indented JSON in the user turn, python_tag tool calls.
LLAMA3 = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none and messages | length > 0 %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Gemma style: content as a list of parts (vLLM's "openai" content format), the system
# turn folded into the first user turn, strict alternation enforced with
# raise_exception, roles renamed, namespace and loop.index0 arithmetic.
GEMMA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- set ns = namespace(turns=0) -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

MODELS = {
    "chatml": dict(template=CHATML, bos=None, eos="<|im_end|>", pad="<|endoftext|>", post_bos=None),
    "llama3": dict(template=LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, post_bos="<|begin_of_text|>"),
    "gemma": dict(template=GEMMA, bos="<bos>", eos="<eos>", pad="<pad>", post_bos="<bos>"),
}


def build_model_dir(name, out_dir):
    """Trains the BPE and writes tokenizer.json + tokenizer_config.json into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = MODELS[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS[name],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    if spec["post_bos"]:
        b = spec["post_bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, tok.token_to_id(b))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "chat_template": spec["template"],
    }
    for key in ("bos", "eos", "pad"):
        if spec[key]:
            cfg[f"{key}_token"] = spec[key]
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return out


# --- requests -----------------------------------------------------------------------

TEXTS = [
    "Hello!", "What's the weather in Paris?", "Écris un poème sur la mer.", "日本の首都はどこですか？",
    "Как тебя зовут?", "Explain KV caches in one line 🚀", "  leading and trailing spaces  ",
    "line one\nline two\n\nline four", "quotes \"double\" and 'single' and \\backslash",
    "tabs\tand <html> & ampersands", "Résumé: naïve café ✅", "The quick brown fox jumps over the lazy dog.",
]
SYSTEMS = ["You are a helpful assistant.", "Réponds en français.", "  Be brief.  ", "あなたは親切なアシスタントです。"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "description": "Søg på nettet — web search",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "limit": {"type": "integer", "default": 5}}}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]


def make_requests(name, n_chat, n_cmpl, seed):
    """(kind, body) pairs for model `name`."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n_cmpl):
        body = {"model": name, "prompt": rng.choice(TEXTS) + " " + rng.choice(TEXTS), "max_tokens": 8}
        if i % 4 == 1:
            body["add_special_tokens"] = False
        if i % 7 == 3:
            body["prompt"] = [body["prompt"], "second prompt of a batch"]
        reqs.append(("completion", body))
    for i in range(n_chat):
        msgs = []
        gemma = name == "gemma"
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        turns = rng.randint(1, 4)
        use_tools = name != "gemma" and rng.random() < 0.35
        for t in range(turns):
            content = rng.choice(TEXTS)
            if rng.random() < 0.25:
                content = [{"type": "text", "text": rng.choice(TEXTS)}, {"type": "text", "text": rng.choice(TEXTS)}]
            msgs.append({"role": "user", "content": content})
            if t == turns - 1:
                break
            if use_tools and rng.random() < 0.5:
                args = {"city": rng.choice(["Paris", "東京", "Zürich"])}
                msgs.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"call_{t}", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps(args, ensure_ascii=rng.random() < 0.5)}}]})
                msgs.append({"role": "tool", "tool_call_id": f"call_{t}", "content": json.dumps({"temp": 21.5, "sky": "clear"})})
                if name == "chatml" and rng.random() < 0.5:
                    msgs.append({"role": "tool", "tool_call_id": f"call_{t}b", "content": "second result"})
                msgs.append({"role": "assistant", "content": rng.choice(TEXTS)})
            else:
                msgs.append({"role": "assistant", "content": rng.choice(TEXTS)})
        body = {"model": name, "messages": msgs, "max_tokens": 8}
        if use_tools:
            body["tools"] = rng.sample(TOOLS, rng.randint(1, 3))
        if i % 9 == 4:
            body["add_generation_prompt"] = False
        if i % 11 == 5:
            body["add_special_tokens"] = True
        if name == "chatml" and i % 5 == 2:
            body["chat_template_kwargs"] = {"enable_thinking": False, "unused_kwarg": 1}
        if name == "llama3":
            body["chat_template_kwargs"] = {"date_string": "30 Nov 2026"}
        if gemma and i % 13 == 6:
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
            body["messages"].append({"role": "assistant", "content": "The answer is"})
            if (len(body["messages"]) - (1 if body["messages"][0]["role"] == "system" else 0)) % 2 == 1:
                body["messages"].pop()  # keep alternation valid
                body["continue_final_message"] = False
        reqs.append(("chat", body))
    return reqs


# --- vLLM's preparation, for the reference -------------------------------------------


def vllm_conversation(messages, openai_format):
    """vLLM 0.33's parse_chat_messages + _postprocess_messages for text-only content."""
    conv = []
    for m in messages:
        content = m.get("content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = content
        texts = [p if isinstance(p, str) else p["text"] for p in parts]
        if openai_format and m["role"] != "tool":
            c = [{"type": "text", "text": t} for t in texts]
        else:
            c = "\n".join(texts)
        msg = {"role": m["role"], "content": c}
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = [dict(tc) for tc in m["tool_calls"]]
        if m["role"] == "tool" and "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        conv.append(msg)
    for msg in conv:
        if msg["role"] == "assistant" and "tool_calls" in msg:
            if not msg["tool_calls"]:
                msg.pop("tool_calls")
                continue
            for item in msg["tool_calls"]:
                f = dict(item["function"])
                a = f.get("arguments")
                if a:
                    if isinstance(a, str):
                        try:
                            a = json.loads(a)
                        except json.JSONDecodeError:
                            a = None
                    f["arguments"] = a if isinstance(a, dict) else {}
                else:
                    f["arguments"] = {}
                item["function"] = f
    return conv


def vllm_tool_dicts(tools):
    """ChatCompletionToolsParam.model_dump() for each tool."""
    if tools is None:
        return None
    out = []
    for t in tools:
        f = t["function"]
        fd = {"name": f["name"], "description": f.get("description"), "parameters": f.get("parameters")}
        if f.get("strict") is not None:
            fd["strict"] = f["strict"]
        out.append({"type": "function", "function": fd})
    return out


def reference_ids(tok, kind, body, openai_format):
    """The token ids vLLM 0.33 would compute for `body`, with transformers."""
    if kind == "completion":
        p = body["prompt"]
        if isinstance(p, list):
            p = p[0]
        return tok.encode(p, add_special_tokens=body.get("add_special_tokens", True))
    conv = vllm_conversation(body["messages"], openai_format)
    kwargs = dict(body.get("chat_template_kwargs") or {})
    text = tok.apply_chat_template(
        conv,
        tools=vllm_tool_dicts(body.get("tools")),
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        tokenize=False,
        **kwargs,
    )
    return tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))


def build_all(root, n_chat=45, n_cmpl=25):
    """Model dirs under root and [(model, kind, body, ids)] from transformers."""
    from transformers import AutoTokenizer

    out = []
    for seed, name in enumerate(MODELS):
        d = build_model_dir(name, pathlib.Path(root) / name)
        tok = AutoTokenizer.from_pretrained(str(d))
        for kind, body in make_requests(name, n_chat, n_cmpl, seed):
            ids = reference_ids(tok, kind, body, openai_format=(name == "gemma"))
            out.append({"model": name, "kind": kind, "body": body, "ids": list(ids)})
    return out


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1])
    vectors = build_all(root)
    with open(root / "vectors.json", "w") as f:
        json.dump({"generated_by": "crates/py/tests/tokenize_fixtures.py", "requests": vectors}, f, ensure_ascii=False, indent=1)
    print(f"{len(vectors)} requests written to {root / 'vectors.json'}")
