"""`dynq export-ollama`: one GGUF file plus a Modelfile whose TEMPLATE is the model's chat template in Ollama's Go
template language, with the sampling parameters low-bit files want and the model's stop texts.

A chat family is data: how a turn of each role opens and closes, how the reply is prompted, and where the system
prompt goes. The same data writes the Go template and renders a conversation the way that Go template will under
Ollama (which joins the system messages into `.System` and keeps them in `.Messages`), so a family is checked
against the model's own Jinja template on probe conversations before it is written. Templates of other families
are not guessed at: the Modelfile says so and carries the Jinja template in a comment.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError

from dynq.core.atomic import atomic_path, atomic_write_text, make_output_folder
from dynq.core.context import RunContext
from dynq.core.visible import has_control
from dynq.deploy.shards import merge, model_stem
from dynq.errors import DynqError, OutputExists
from dynq.gguf_io.reader import GGUFModel
from dynq.llamacpp.runtime import _quiet_llama, llama
from dynq.version import __version__

log = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str  # text that only this family's Jinja templates contain
    open: str  # a turn's opening, with {role}
    close: str  # a turn's closing
    roles: tuple[tuple[str, str], ...]  # message role -> role name in the markup
    system_in_first_user: bool  # no system turn: the system prompt opens the first user message
    stop: tuple[str, ...]  # the texts that end a reply
    default_system_pattern: str  # regex on a user-only rendering that captures a built-in system prompt, or ""

    def role(self, role: str) -> str:
        return dict(self.roles).get(role, role)

    def turn(self, role: str, content: str) -> str:
        return self.open.format(role=self.role(role)) + content + self.close

    @property
    def reply_prompt(self) -> str:
        return self.open.format(role=self.role("assistant"))


FAMILIES = (
    ChatFamily(
        name="chatml", marker="<|im_start|>", open="<|im_start|>{role}\n", close="<|im_end|>\n",
        roles=(), system_in_first_user=False, stop=("<|im_end|>",),
        default_system_pattern=r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n",
    ),
    ChatFamily(
        name="llama3", marker="<|start_header_id|>", open="<|start_header_id|>{role}<|end_header_id|>\n\n",
        close="<|eot_id|>", roles=(), system_in_first_user=False, stop=("<|eot_id|>",),
        default_system_pattern=r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    ),
    ChatFamily(
        name="gemma", marker="<start_of_turn>", open="<start_of_turn>{role}\n", close="<end_of_turn>\n",
        roles=(("assistant", "model"),), system_in_first_user=True, stop=("<end_of_turn>",),
        default_system_pattern="",
    ),
)  # fmt: skip

# Conversations every family is checked on: a lone question, a system prompt, several turns.
PROBES: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "What is 2+2?"},),
    ({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime."}),
    (
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Reverse a list."},
        {"role": "assistant", "content": "xs[::-1]"},
        {"role": "user", "content": "And a string?"},
    ),
    (
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye."},
    ),
)


def detect_family(jinja: str) -> ChatFamily | None:
    for family in FAMILIES:
        if family.marker in jinja:
            return family
    return None


def render_jinja(template: str, messages: list[Message], bos: str, eos: str, add_generation_prompt: bool = True) -> str:
    """The model's template applied as llama-cpp-python (and, with the same environment, transformers) applies it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt)
    prompt: str = formatter(messages=messages).prompt  # type: ignore[arg-type]
    return prompt


def default_system(family: ChatFamily, template: str, bos: str, eos: str, adds_bos: bool) -> str:
    """The system prompt the template inserts when the conversation has none (Qwen's, SmolLM's), or ''."""
    if not family.default_system_pattern:
        return ""
    text = render_jinja(template, [{"role": "user", "content": "x"}], bos, eos)
    if adds_bos and bos:
        text = text.removeprefix(bos)
    m = re.match(family.default_system_pattern, text, re.DOTALL)
    return m.group(1) if m else ""


def _go_text(text: str) -> str:
    """Literal text inside a Go template: only an opening '{{' would be read as an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(family: ChatFamily) -> str:
    """The family as an Ollama TEMPLATE. No trim markers: every newline in it is one the model's markup has."""
    parts = ['{{ $system := .System }}{{ $last := "" }}']
    if not family.system_in_first_user:
        system_open = _go_text(family.open.format(role=family.role("system")))
        parts.append("{{ if $system }}" + system_open + "{{ $system }}" + _go_text(family.close) + "{{ end }}")
    parts.append("{{ range .Messages }}")
    user_open = _go_text(family.open.format(role=family.role("user")))
    if family.system_in_first_user:
        # the system prompt opens the first user message, then is spent
        user_open += '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
    parts.append('{{ if eq .Role "user" }}' + user_open + "{{ .Content }}" + _go_text(family.close))
    parts.append('{{ else if eq .Role "assistant" }}' + _go_text(family.open.format(role=family.role("assistant")))
                 + "{{ .Content }}" + _go_text(family.close) + "{{ end }}")  # fmt: skip
    parts.append('{{ if ne .Role "system" }}{{ $last = .Role }}{{ end }}{{ end }}')
    parts.append('{{ if ne $last "assistant" }}' + _go_text(family.reply_prompt) + "{{ end }}")
    return "".join(parts)


def render_ollama(family: ChatFamily, messages: list[Message], modelfile_system: str) -> str:
    """What `go_template(family)` renders under Ollama: the SYSTEM line stands in when no system message is given,
    system messages are joined into `.System`, the reply is prompted unless the last turn is the assistant's."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = "\n\n".join(systems) if systems else modelfile_system
    out = []
    if system and not family.system_in_first_user:
        out.append(family.turn("system", system))
    last = ""
    for m in messages:
        if m["role"] == "user":
            content = m["content"]
            if system and family.system_in_first_user:
                content, system = system + "\n\n" + content, ""
            out.append(family.turn("user", content))
        elif m["role"] == "assistant":
            out.append(family.turn("assistant", m["content"]))
        if m["role"] != "system":
            last = m["role"]
    if last != "assistant":
        out.append(family.reply_prompt)
    return "".join(out)


def check_family(family: ChatFamily, template: str, bos: str, eos: str, adds_bos: bool) -> list[str]:
    """Where the family's rendering differs from the model's template, one line per probe conversation ([] when
    they agree on all). Probes the model's template refuses (a system role it does not support) are skipped. A BOS
    the template writes is dropped from the comparison when llama.cpp's tokenizer adds it anyway, as Ollama's does."""
    system = default_system(family, template, bos, eos, adds_bos)
    problems = []
    for probe in PROBES:
        messages = list(probe)
        try:
            want = render_jinja(template, messages, bos, eos)
        except (ValueError, TemplateError):  # the template refuses this shape (e.g. raise_exception on system)
            continue
        if adds_bos and bos:
            want = want.removeprefix(bos)
        got = render_ollama(family, messages, system)
        if got != want:
            problems.append(f"{len(messages)} messages: model renders {want!r}, Ollama would render {got!r}")
    return problems


@dataclass(frozen=True)
class Vocab:
    """What llama.cpp's tokenizer says about a model (read with a vocabulary-only load)."""

    bos: str
    eos: str
    adds_bos: bool
    end_texts: tuple[str, ...]  # end-of-generation tokens (eos, eot) as text


def read_vocab(path: Path) -> Vocab:
    L = llama()
    _quiet_llama()
    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise DynqError(f"{path}: llama.cpp could not read this model's vocabulary")
    try:
        vocab = L.llama_model_get_vocab(model)

        def text(token: int) -> str:
            return L.llama_vocab_get_text(vocab, token).decode("utf-8", "replace") if token >= 0 else ""

        ends = (int(L.llama_vocab_eos(vocab)), int(L.llama_vocab_eot(vocab)))
        return Vocab(text(int(L.llama_vocab_bos(vocab))), text(ends[0]), bool(L.llama_vocab_get_add_bos(vocab)),
                     tuple(dict.fromkeys(text(t) for t in ends if t >= 0)))  # fmt: skip
    finally:
        L.llama_model_free(model)


@dataclass(frozen=True)
class Modelfile:
    text: str
    family: str | None  # None: no template, or one dynq does not translate
    default_system: str = ""
    problems: list[str] = field(default_factory=list)  # where the translation renders differently from the model


def _comment(text: str) -> list[str]:
    return ["# " + line if line else "#" for line in text.splitlines()]


def _quoted(text: str) -> str:
    if '"""' in text:
        raise DynqError('the chat template contains \'"""\', which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(model: GGUFModel, vocab: Vocab, gguf_name: str, temperature: float, min_p: float) -> Modelfile:
    """The Modelfile for `model` stored as `gguf_name` beside it."""
    template = model.field("tokenizer.chat_template")
    lines = [f"# Modelfile written by dynq {__version__} for {gguf_name}", f"FROM ./{gguf_name}"]
    family = detect_family(template) if isinstance(template, str) else None
    system, problems = "", []
    stops = list(vocab.end_texts)
    if not isinstance(template, str) or not template.strip():
        lines[1:1] = ["# The model has no chat template (a base model?): Ollama will prompt it with plain text."]
    elif family is None:
        lines[1:1] = ["# Chat template NOT RECOGNISED: dynq translates ChatML (Qwen2, SmolLM), Llama 3 and Gemma",
                      "# templates. Without a TEMPLATE line Ollama guesses one from the GGUF's own template; here it",
                      "# is, to write one by hand:", *_comment(template)]  # fmt: skip
    else:
        system = default_system(family, template, vocab.bos, vocab.eos, vocab.adds_bos)
        problems = check_family(family, template, vocab.bos, vocab.eos, vocab.adds_bos)
        if problems:
            lines[1:1] = [f"# WARNING: the {family.name} template below renders some conversations differently "
                          "from the model's own template:", *_comment("\n".join(problems))]  # fmt: skip
        else:
            lines[1:1] = [f"# Chat template: {family.name}, translated from the model's own; both render the same "
                          f"text on {len(PROBES)} probe conversations."]  # fmt: skip
        lines.append("TEMPLATE " + _quoted(go_template(family)))
        if system:
            lines.append("SYSTEM " + _quoted(system))
        stops = [*family.stop, *stops]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER min_p {min_p:g}"]
    # a stop text is the model's data: one that a Modelfile line cannot hold as it is (a quote, a line break, any
    # control character) is left out rather than let it end the line and start a directive of its own
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s and not has_control(s) and '"' not in s
              and "\n" not in s]  # fmt: skip
    return Modelfile("\n".join(lines) + "\n", family.name if family else None, system, problems)


@dataclass(frozen=True)
class OllamaExport:
    gguf: Path
    modelfile: Path
    content: Modelfile


def _copy_file(source: Path, target: Path, link: bool) -> None:
    try:
        with atomic_path(target) as tmp:
            if link:
                os.link(source, tmp)
            else:
                shutil.copyfile(source, tmp)
    except OSError as e:
        raise DynqError(f"{target}: could not {'link' if link else 'copy'} the model there ({e.strerror or e})") from e


def ollama_name(stem: str) -> str:
    """The model's name as Ollama takes it and a Modelfile's `FROM ./NAME.gguf` can hold: letters, digits, `.`, `_`
    and `-` (a file name from a stranger may hold line breaks that would add Modelfile directives)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"


def export_ollama(source: str | Path, out_dir: str | Path, *, temperature: float = 0.6, min_p: float = 0.05,
                  link: bool = False, overwrite: bool = False,
                  ctx: RunContext | None = None) -> OllamaExport:  # fmt: skip
    """Write `out_dir/NAME.gguf` (shards merged; a single file copied, or hard-linked with `link`) and
    `out_dir/Modelfile`; then `ollama create NAME -f out_dir/Modelfile` imports it."""
    model = GGUFModel(source)
    folder = Path(out_dir)
    make_output_folder(folder)
    gguf = folder / (ollama_name(model_stem(model.path)) + ".gguf")
    target_modelfile = folder / "Modelfile"
    for target in (gguf, target_modelfile):
        if target.exists() and not overwrite:
            raise OutputExists(target)
    # the Modelfile is made first: a template that cannot be written stops the export before gigabytes are copied
    content = modelfile(model, read_vocab(model.shards[0]), gguf.name, temperature, min_p)
    if len(model.shards) > 1:
        merge(model.path, gguf, overwrite=overwrite, ctx=ctx)
    else:
        _copy_file(model.path, gguf, link)
    atomic_write_text(target_modelfile, content.text)
    if content.problems:
        log.warning(
            "%s: the Ollama template differs from the model's on %d conversations; see the Modelfile",
            model.path,
            len(content.problems),
        )
    return OllamaExport(gguf, target_modelfile, content)
