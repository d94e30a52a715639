"""Evaluation sets. Each file given to --eval_files is one of two kinds:
- questions with reference answers, scored by EM/F1 on greedy generations. These are chat records
  (messages, ShareGPT, Alpaca; the last assistant turn is the reference and the turns before it
  are the prompt) or QA records ({"question", "answer" | "answers"}, {"prompt", "response" |
  "completion" | "answer"}, optionally with "system");
- text (.txt, or records with the --text_field), scored by perplexity.

A sample that cannot be read stops the evaluation with its file:line (exit 2): a score over a
silently shrunk set would look like a score over the whole one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainers.data.chat import SampleError, detect_format, iter_records, to_conversation
from trainers.errors import UsageError

QA_FIELDS = (("question", "answers"), ("question", "answer"), ("prompt", "response"), ("prompt", "completion"),
             ("prompt", "answer"))
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass(frozen=True)
class Question:
    where: str  # file:line, for messages and predictions.jsonl
    messages: tuple  # the prompt: [system] user (assistant user)*
    references: tuple  # acceptable answers (SQuAD-style sets may have several)
    tools: list | None = None  # the record's tools, for the chat template


def _qa_fields(record) -> tuple[str, str] | None:
    if isinstance(record, dict):
        for question, answer in QA_FIELDS:
            if question in record and answer in record:
                return question, answer
    return None


def kind_of(path: Path, text_field: str) -> str:
    """'questions' or 'text', from the file's suffix or its first record."""
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    for where, record in iter_records(path):
        if isinstance(record, SampleError):
            raise UsageError(f"{where}: {record}; fix the line")
        if _qa_fields(record):
            return "questions"
        if isinstance(record, dict) and text_field in record and not any(k in record for k in ("messages", "conversations", "instruction")):
            return "text"
        detect_format(record, where)  # a chat record, or a UsageError naming the fields it has
        return "questions"
    raise UsageError(f"--eval_files {path}: empty; pass a file with questions or text")


def _answers(value, where: str) -> tuple:
    if isinstance(value, dict) and isinstance(value.get("text"), list):  # SQuAD: {"text": [...], "answer_start": [...]}
        value = value["text"]
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise UsageError(f"{where}: the answer must be a string or a non-empty list of strings")
    return tuple(value)


def question_from(record, chat_format: str, where: str) -> Question:
    fields = _qa_fields(record) if chat_format in ("auto", "qa") else None
    if fields:
        question, answer = fields
        if not isinstance(record[question], str) or not record[question].strip():
            raise UsageError(f"{where}: '{question}' must be a non-empty string")
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else [])
        messages.append({"role": "user", "content": record[question]})
        return Question(where, tuple(messages), _answers(record[answer], where))
    if chat_format == "qa":
        raise UsageError(f"{where}: --chat_format qa needs one of the field pairs {', '.join('/'.join(p) for p in QA_FIELDS)}")
    try:
        conversation = to_conversation(record, detect_format(record, where) if chat_format == "auto" else chat_format)
    except SampleError as err:
        raise UsageError(f"{where}: {err} ({err.reason}); fix the sample") from None
    *prompt, last = conversation.messages  # a conversation ends on an assistant turn: its answer is the reference
    if last.get("tool_calls") or not last["content"].strip():
        raise UsageError(f"{where}: the last assistant turn has no text answer to score (tool calls are not scored); "
                         f"end the conversation with the answer")
    return Question(where, tuple(prompt), (last["content"],), conversation.tools)


def read_questions(path: Path, chat_format: str, max_samples: int = 0) -> list[Question]:
    questions = []
    for where, record in iter_records(path):
        if isinstance(record, SampleError):
            raise UsageError(f"{where}: {record}; fix the line")
        questions.append(question_from(record, chat_format, where))
        if max_samples and len(questions) == max_samples:
            break
    if not questions:
        raise UsageError(f"--eval_files {path}: no questions")
    return questions
