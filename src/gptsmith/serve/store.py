"""The conversation and feedback store: SQLAlchemy 2.x ORM over SQLite (default) or any SQLAlchemy URL.

Messages form a tree: `parent_id` is the message a turn answers or follows, so editing a user message
adds a sibling (same parent) and regenerating an answer adds a sibling with `regeneration_of_id` set.
The branch a conversation shows is the path from the root to its newest message. Every exchange is kept,
including the ones made through the /v1 API, because they are the raw material of the feedback loop.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, TypeDecorator, bindparam,
                        create_engine, delete, event, func, inspect, or_, select, text, update)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload, sessionmaker

from gptsmith.errors import InputError


class MessageGone(LookupError):
    """The message to update no longer exists: its conversation was deleted (e.g. from another tab)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


# 64-bit row ids on every backend (SQLite's INTEGER PRIMARY KEY already is; PostgreSQL's INTEGER is 32-bit)
RowId = BigInteger().with_variant(Integer, "sqlite")
MAX_ROW_ID = 2**63 - 1


class _NoNul:
    """PostgreSQL's text types cannot hold NUL (U+0000) and refuse the whole write; a model or a user can
    produce one, so every backend stores U+FFFD in its place."""

    def process_bind_param(self, value, dialect):
        return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class StoredText(_NoNul, TypeDecorator):
    impl = Text
    cache_ok = True


class StoredString(_NoNul, TypeDecorator):
    impl = String
    cache_ok = True


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    title: Mapped[str] = mapped_column(StoredString(200), default="")
    system_prompt: Mapped[str] = mapped_column(StoredText, default="")
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # the UI's sampling settings for this chat
    source: Mapped[str] = mapped_column(String(20), default="ui")  # ui | api
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    messages: Mapped[list[Message]] = relationship(back_populates="conversation", cascade="all, delete-orphan",
                                                   passive_deletes=True, order_by="Message.id")


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(RowId, ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    regeneration_of_id: Mapped[int | None] = mapped_column(RowId, ForeignKey("messages.id", ondelete="SET NULL"))
    role: Mapped[str] = mapped_column(String(20))
    content: Mapped[str] = mapped_column(StoredText, default="")
    model_name: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(200))
    sampling: Mapped[dict | None] = mapped_column(JSON)
    latency_s: Mapped[float | None] = mapped_column(Float)  # request to last token
    ttft_s: Mapped[float | None] = mapped_column(Float)  # request to first token
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(20))  # None while streaming (or killed mid-answer)
    # an assistant's answer: its chain of thought kept apart from the answer, the retrieved passages it was given
    # (numbered as the model saw them) and what the context budget dropped (see ADDED_COLUMNS)
    reasoning: Mapped[str | None] = mapped_column(StoredText)
    sources: Mapped[list | None] = mapped_column(JSON)
    dropped: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    conversation: Mapped[Conversation] = relationship(back_populates="messages")
    feedback: Mapped[Feedback | None] = relationship(back_populates="message", cascade="all, delete-orphan",
                                                     passive_deletes=True, uselist=False)


class Feedback(Base):
    """One row per rated message; the UI updates it in place (the latest opinion is the one that counts)."""
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(RowId, ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    rating: Mapped[int | None] = mapped_column(Integer)  # +1 / -1 / None
    comment: Mapped[str | None] = mapped_column(StoredText)
    correction: Mapped[str | None] = mapped_column(StoredText)  # "a better answer" written by the user
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    message: Mapped[Message] = relationship(back_populates="feedback")


class ArenaBattle(Base):
    """One blind-arena battle: a user message (in a conversation of its own, source "arena") answered by two
    served models as sibling assistant messages, and the user's vote. The answers' model names stay off the
    messages until the vote (the battle row holds them), so nothing the UI can fetch gives them away. Deleting
    the conversation keeps the vote (its message links become NULL): the leaderboard still counts it."""
    __tablename__ = "arena_battles"
    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str | None] = mapped_column(ForeignKey("conversations.id", ondelete="SET NULL"),
                                                        index=True)
    user_message_id: Mapped[int | None] = mapped_column(RowId, ForeignKey("messages.id", ondelete="SET NULL"))
    message_a_id: Mapped[int | None] = mapped_column(RowId, ForeignKey("messages.id", ondelete="SET NULL"))
    message_b_id: Mapped[int | None] = mapped_column(RowId, ForeignKey("messages.id", ondelete="SET NULL"))
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    version_a: Mapped[str | None] = mapped_column(String(200))
    version_b: Mapped[str | None] = mapped_column(String(200))
    winner: Mapped[str | None] = mapped_column(String(20))  # a | b | tie | both_bad; None until the vote
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    voted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class AlreadyVoted(Exception):
    """The battle has its vote; a battle is voted exactly once."""


# Columns added to tables after their first release: a store created by an older gptsmith gets them at startup
ADDED_COLUMNS = {"messages": ("reasoning", "sources", "dropped")}


def add_missing_columns(engine) -> None:
    """ALTER TABLE ... ADD COLUMN for each of ADDED_COLUMNS an older database lacks (create_all makes new tables
    only). Nullable columns, so old rows stay valid. Idempotent, and safe when two servers start together: a
    column another process added meanwhile is not an error."""
    for table_name, names in ADDED_COLUMNS.items():
        table = Base.metadata.tables[table_name]
        for name in names:
            if name in {c["name"] for c in inspect(engine).get_columns(table_name)}:
                continue
            kind = table.c[name].type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {table_name} ADD COLUMN {name} {kind}'))
            except (OperationalError, ProgrammingError):
                if name not in {c["name"] for c in inspect(engine).get_columns(table_name)}:
                    raise


def database_url(db_url: str) -> URL:
    """The URL with its driver: a plain postgresql:// URL means psycopg 3 (the `postgres` extra), not
    SQLAlchemy's default psycopg2, which gptsmith does not install."""
    try:
        url = make_url(db_url)
    except ArgumentError as e:
        raise InputError(f"serve.db: '{db_url}' is not a database URL ({e}); use e.g. sqlite:///gptsmith.db or "
                         "postgresql://user@host/dbname") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def make_engine(db_url: str):
    """SQLite gets WAL (readers never block the writer) and a busy timeout (writers wait instead of failing)."""
    url = database_url(db_url)
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:  # a database server restarted under us leaves dead pooled connections: test each before use
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(url, **kwargs)
    except ImportError as e:
        extra = " (pip install 'gptsmith[postgres]')" if url.get_backend_name() == "postgresql" else ""
        raise InputError(f"serve.db: the database driver for '{url.drivername}' is not installed{extra}: {e}") from None
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is durable against process crashes
            cur.close()
    return engine


def iso_utc(t: datetime | None) -> str | None:
    """UTC with its offset on every backend: SQLite hands back naive datetimes, PostgreSQL aware ones in the
    session's time zone."""
    if t is None:
        return None
    return (t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)).isoformat()


def message_dict(m: Message, with_feedback: bool = True) -> dict:
    d = {"id": m.id, "conversation_id": m.conversation_id, "parent_id": m.parent_id,
         "regeneration_of_id": m.regeneration_of_id, "role": m.role, "content": m.content,
         "model_name": m.model_name, "model_version": m.model_version, "sampling": m.sampling,
         "latency_s": m.latency_s, "ttft_s": m.ttft_s, "prompt_tokens": m.prompt_tokens,
         "completion_tokens": m.completion_tokens, "finish_reason": m.finish_reason,
         "reasoning": m.reasoning, "sources": m.sources, "dropped": m.dropped, "created_at": iso_utc(m.created_at)}
    if with_feedback:
        fb = m.feedback
        d["feedback"] = None if fb is None else {"rating": fb.rating, "comment": fb.comment,
                                                  "correction": fb.correction}
    return d


def battle_dict(b: ArenaBattle, messages: dict[int, Message]) -> dict:
    """A battle with its question and both answers' text (None for an answer whose conversation was deleted)."""
    def answer(msg_id):
        m = messages.get(msg_id)
        return None if m is None else {"message_id": m.id, "content": m.content, "finish_reason": m.finish_reason}

    question = messages.get(b.user_message_id)
    return {"id": b.id, "conversation_id": b.conversation_id, "prompt": None if question is None else question.content,
            "a": answer(b.message_a_id), "b": answer(b.message_b_id), "model_a": b.model_a, "model_b": b.model_b,
            "winner": b.winner, "created_at": iso_utc(b.created_at), "voted_at": iso_utc(b.voted_at)}


def conversation_dict(c: Conversation) -> dict:
    return {"id": c.id, "title": c.title, "system_prompt": c.system_prompt, "settings": c.settings or {},
            "source": c.source, "created_at": iso_utc(c.created_at), "updated_at": iso_utc(c.updated_at)}


def branch(messages: list[Message], leaf_id: int | None = None) -> list[Message]:
    """The path root -> leaf (default: the newest message), i.e. what the conversation currently shows."""
    if not messages:
        return []
    by_id = {m.id: m for m in messages}
    node = by_id.get(leaf_id) if leaf_id is not None else max(messages, key=lambda m: m.id)
    path = []
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    return path[::-1]


def history(conv: Conversation, path: list[Message], system_prompt: str | None = None) -> list[dict]:
    """OpenAI-style messages for a branch, with the system prompt (default: the conversation's) first."""
    system_prompt = conv.system_prompt if system_prompt is None else system_prompt
    msgs = [{"role": m.role, "content": m.content} for m in path]
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


class Store:
    """Thin query layer. Every method opens its own short session, so it is safe to call from worker threads."""

    def __init__(self, db_url: str):
        self.url = db_url
        self.engine = make_engine(db_url)
        Base.metadata.create_all(self.engine)
        add_missing_columns(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite lets one writer in at a time and makes the others poll with sleeps of up to 100 ms (its busy
        # handler); queueing our own writers on a lock wakes the next one as soon as the previous commits.
        # 16 streams starting together spent most of their time to first token in those sleeps.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" else None

    def _writing(self):
        return self._write_lock if self._write_lock is not None else nullcontext()

    def close(self) -> None:
        self.engine.dispose()

    # conversations -------------------------------------------------------------------------------------
    def create_conversation(self, title: str = "", system_prompt: str = "", settings: dict | None = None,
                            source: str = "ui") -> dict:
        with self._writing(), self.Session.begin() as s:
            c = Conversation(title=title, system_prompt=system_prompt, settings=settings or {}, source=source)
            s.add(c)
            s.flush()
            return conversation_dict(c)

    def list_conversations(self, query: str = "", limit: int = 200, source: str | None = None) -> list[dict]:
        with self.Session() as s:
            stmt = select(Conversation).order_by(Conversation.updated_at.desc()).limit(limit)
            if source:
                stmt = stmt.where(Conversation.source == source)
            if query:
                like = f"%{query.lower()}%".replace("\x00", "\ufffd")  # as StoredText wrote it
                hits = select(Message.conversation_id).where(func.lower(Message.content).like(like))
                stmt = stmt.where(or_(func.lower(Conversation.title).like(like), Conversation.id.in_(hits)))
            return [conversation_dict(c) for c in s.scalars(stmt)]

    def get_conversation(self, conv_id: str, all_messages: bool = False) -> dict | None:
        with self.Session() as s:
            c = s.get(Conversation, conv_id)
            if c is None:
                return None
            # feedback with the messages in one more query, not one lazy SELECT per message in message_dict
            msgs = list(s.scalars(select(Message).where(Message.conversation_id == conv_id)
                                  .options(selectinload(Message.feedback)).order_by(Message.id)))
            shown = msgs if all_messages else branch(msgs)
            children: dict[int | None, list[int]] = {}
            for m in msgs:
                children.setdefault(m.parent_id, []).append(m.id)
            out = conversation_dict(c)
            out["messages"] = []
            for m in shown:
                d = message_dict(m)
                d["siblings"] = children.get(m.parent_id, [m.id])  # other versions of this turn (edits/regenerations)
                out["messages"].append(d)
            return out

    def update_conversation(self, conv_id: str, **fields) -> dict | None:
        with self._writing(), self.Session.begin() as s:
            c = s.get(Conversation, conv_id)
            if c is None:
                return None
            for k, v in fields.items():
                if v is not None:
                    setattr(c, k, v)
            c.updated_at = utcnow()
            return conversation_dict(c)

    def delete_conversation(self, conv_id: str) -> bool:
        with self._writing(), self.Session.begin() as s:
            c = s.get(Conversation, conv_id)
            if c is None:
                return False
            ids = select(Message.id).where(Message.conversation_id == conv_id)
            s.execute(delete(Feedback).where(Feedback.message_id.in_(ids)))
            # children first: parent links point inside the same conversation
            s.execute(Message.__table__.update().where(Message.conversation_id == conv_id)
                      .values(parent_id=None, regeneration_of_id=None))
            s.execute(delete(Message).where(Message.conversation_id == conv_id))
            s.delete(c)
            return True

    # messages ------------------------------------------------------------------------------------------
    def get_message(self, msg_id: int) -> dict | None:
        if not 0 < msg_id <= MAX_ROW_ID:  # no such row; the database would refuse the number itself
            return None
        with self.Session() as s:
            m = s.get(Message, msg_id)
            return None if m is None else message_dict(m)

    def context_for(self, conv_id: str, parent_id: int | None, system_prompt: str | None = None) -> list[dict]:
        """The history a new answer to `parent_id` sees: system prompt (default: the conversation's) + the branch
        ending at parent_id."""
        with self.Session() as s:
            c = s.get(Conversation, conv_id)
            msgs = list(s.scalars(select(Message).where(Message.conversation_id == conv_id)))
            path = branch(msgs, parent_id) if parent_id is not None else []
            return history(c, path, system_prompt)

    def leaf_id(self, conv_id: str) -> int | None:
        with self.Session() as s:
            return s.scalar(select(func.max(Message.id)).where(Message.conversation_id == conv_id))

    def add_message(self, conv_id: str, role: str, content: str, parent_id: int | None = None, **fields) -> dict:
        with self._writing(), self.Session.begin() as s:
            m = Message(conversation_id=conv_id, role=role, content=content, parent_id=parent_id, **fields)
            s.add(m)
            c = s.get(Conversation, conv_id)
            c.updated_at = utcnow()
            if not c.title and role == "user":
                c.title = " ".join(content.split())[:60]
            s.flush()
            return message_dict(m, with_feedback=False) | {"feedback": None}

    def add_chain(self, conv_id: str, messages: list[dict]) -> int | None:
        """Insert a list of messages as one branch (an API request's history); returns the last id."""
        parent = None
        with self._writing(), self.Session.begin() as s:
            for msg in messages:
                m = Message(conversation_id=conv_id, role=msg["role"], content=msg["content"], parent_id=parent)
                s.add(m)
                s.flush()
                parent = m.id
        return parent

    def update_message(self, msg_id: int, **fields) -> None:
        """MessageGone when the message no longer exists."""
        with self._writing(), self.Session.begin() as s:
            m = s.get(Message, msg_id)
            if m is None:
                raise MessageGone(f"message {msg_id} no longer exists (its conversation was deleted)")
            for k, v in fields.items():
                setattr(m, k, v)

    def update_streaming(self, contents: dict[int, str]) -> None:
        """Save the partial text of answers still streaming, in one transaction. An answer that has finished
        meanwhile (finish_reason set) keeps its final text: this write may land after the final one."""
        if not contents:
            return
        t = Message.__table__
        stmt = (t.update().where(t.c.id == bindparam("mid"), t.c.finish_reason.is_(None))
                .values(content=bindparam("text")))
        with self._writing(), self.engine.begin() as conn:
            conn.execute(stmt, [{"mid": mid, "text": text} for mid, text in contents.items()])

    # feedback ------------------------------------------------------------------------------------------
    def set_feedback(self, msg_id: int, **fields) -> dict | None:
        """Upsert: only the fields given change; rating 0 clears the thumb, "" clears a comment/correction."""
        if not 0 < msg_id <= MAX_ROW_ID:
            return None
        try:
            return self._set_feedback(msg_id, fields)
        except IntegrityError:  # another writer created this row meanwhile (PostgreSQL's writers do not queue
            return self._set_feedback(msg_id, fields)  # like SQLite's): update theirs

    def _set_feedback(self, msg_id: int, fields: dict) -> dict | None:
        with self._writing(), self.Session.begin() as s:
            m = s.get(Message, msg_id)
            if m is None:
                return None
            fb = m.feedback or Feedback(message_id=msg_id)
            for k, v in fields.items():
                if k == "rating":
                    fb.rating = v or None
                else:
                    setattr(fb, k, v or None)
            fb.updated_at = utcnow()
            s.add(fb)
            return {"rating": fb.rating, "comment": fb.comment, "correction": fb.correction}

    # arena ---------------------------------------------------------------------------------------------
    def add_battle(self, conv_id: str, user_message_id: int, message_a_id: int, message_b_id: int, model_a: str,
                   model_b: str, version_a: str | None = None, version_b: str | None = None) -> dict:
        """Record a battle over two stored answers, and take the model names off those answers until the vote."""
        with self._writing(), self.Session.begin() as s:
            b = ArenaBattle(conversation_id=conv_id, user_message_id=user_message_id, message_a_id=message_a_id,
                            message_b_id=message_b_id, model_a=model_a, model_b=model_b, version_a=version_a,
                            version_b=version_b)
            s.add(b)
            s.execute(update(Message).where(Message.id.in_((message_a_id, message_b_id)))
                      .values(model_name=None, model_version=None))
            s.flush()
            return self._battle(s, b)

    def get_battle(self, battle_id: int) -> dict | None:
        if not 0 < battle_id <= MAX_ROW_ID:
            return None
        with self.Session() as s:
            b = s.get(ArenaBattle, battle_id)
            return None if b is None else self._battle(s, b)

    def _battle(self, s, b: ArenaBattle) -> dict:
        ids = [i for i in (b.user_message_id, b.message_a_id, b.message_b_id) if i is not None]
        return battle_dict(b, {m.id: m for m in s.scalars(select(Message).where(Message.id.in_(ids)))})

    def vote_battle(self, battle_id: int, winner: str) -> dict | None:
        """Record the vote (a | b | tie | both_bad) and put the model names back on the answers; None when there is
        no such battle, AlreadyVoted when it has its vote. One conditional UPDATE decides, so of two votes racing
        (two tabs, two server processes) exactly one counts."""
        if not 0 < battle_id <= MAX_ROW_ID:
            return None
        with self._writing(), self.Session.begin() as s:
            voted = s.execute(update(ArenaBattle).where(ArenaBattle.id == battle_id, ArenaBattle.winner.is_(None))
                              .values(winner=winner, voted_at=utcnow()))
            b = s.get(ArenaBattle, battle_id)
            if b is None:
                return None
            if voted.rowcount != 1:
                raise AlreadyVoted(f"battle {battle_id} already has its vote ({b.winner})")
            for msg_id, name, version in ((b.message_a_id, b.model_a, b.version_a),
                                          (b.message_b_id, b.model_b, b.version_b)):
                if msg_id is not None:
                    s.execute(update(Message).where(Message.id == msg_id)
                              .values(model_name=name, model_version=version))
            return self._battle(s, b)

    def list_votes(self, by_version: bool = False) -> list[dict]:
        """Every voted battle as {model_a, model_b, winner}, in the order the votes came (what Elo needs). With
        `by_version`, each side is "name@version" (a registry's chat@v2), so every version of a model is rated on
        its own votes: a promotion shows on the leaderboard as a new entry, not as a drift of the old one."""
        with self.Session() as s:
            rows = s.execute(select(ArenaBattle.model_a, ArenaBattle.model_b, ArenaBattle.version_a,
                                    ArenaBattle.version_b, ArenaBattle.winner)
                             .where(ArenaBattle.winner.is_not(None))
                             .order_by(ArenaBattle.voted_at, ArenaBattle.id))

            def name(model: str, version: str | None) -> str:
                return f"{model}@{version}" if by_version and version else model

            return [{"model_a": name(a, va), "model_b": name(b, vb), "winner": w} for a, b, va, vb, w in rows]
