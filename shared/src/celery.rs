//! Celery's wire formats, as dynachord relies on them (see
//! `docs/CELERY_WIRE.md`): the signature a worker sends as `request.chord`,
//! Python reprs as Celery writes them in `argsrepr` and exception messages,
//! kombu's SQS queue naming, and the protocol-2 task message in kombu's SQS
//! envelope.
//!
//! This module is a leaf: it depends only on [`crate::ids`] and
//! [`crate::time`], so every layer above may use it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::ids::TaskId;
use crate::time::celery_datetime_in;

/// Celery's canvas primitives, as their signatures name them.
pub const CHAIN: &str = "celery.chain";
pub const GROUP: &str = "celery.group";
pub const CHORD: &str = "celery.chord";

/// The option of a chord's body that says how many failed parts it tolerates.
pub const TOLERATED_FAILURES: &str = "tolerated_failures";
/// The option that says what share of its parts, in percent.
pub const TOLERATED_FAILURE_PERCENTAGE: &str = "tolerated_failure_percentage";
/// The option of a chord's body that asks for its parts' results to be
/// forgotten once its callback has been sent.
pub const FORGET_PARTS: &str = "forget_parts";

/// The options of a chord's body that give it a deadline, in seconds from
/// when its first part was counted, and ask it to fail when the deadline
/// passes with parts missing.
pub const DEADLINE_SECONDS: &str = "deadline_seconds";
pub const FAIL_AT_DEADLINE: &str = "fail_at_deadline";
/// The longest deadline a chord may carry: 7 days.
pub const MAX_DEADLINE_SECONDS: u64 = 7 * 24 * 3600;

/// The option of a chord's body that nests its results as its header
/// nests them, for a header with a chain that ends in a group
/// (`chord([a, b | group(c, d)], body)` calls back with `[ra, [rc, rd]]`):
/// a JSON array whose items are `null` (one part) or an array of the same
/// kind (a group), the parts in slot order. Set by the Celery package.
pub const HEADER_SHAPE: &str = "dynachord_header_shape";
/// How deep a header shape may nest.
pub const MAX_HEADER_SHAPE_DEPTH: usize = 32;

/// How a chord's results are laid out in its callback's first argument:
/// the text that goes before each part's result, in slot order, and after
/// the last ([`Signature::results_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultsLayout {
    /// One list: `[r0,r1,...]`.
    Flat,
    /// Nested as the body's [`HEADER_SHAPE`] says.
    Nested { before: Vec<String>, after: String },
}

impl ResultsLayout {
    /// What goes before the result in `slot`.
    pub fn before(&self, slot: usize) -> &str {
        match self {
            Self::Flat if slot == 0 => "[",
            Self::Flat => ",",
            Self::Nested { before, .. } => before.get(slot).map_or(",", String::as_str),
        }
    }

    /// What closes the results, after the last part's.
    pub fn after(&self) -> &str {
        match self {
            Self::Flat => "]",
            Self::Nested { after, .. } => after,
        }
    }

    /// Reads a header shape of `size` parts.
    fn nested(shape: &Value, size: u32) -> Result<Self, String> {
        fn walk(shape: &Value, depth: usize, pending: &mut String, before: &mut Vec<String>) -> Result<(), String> {
            let Value::Array(items) = shape else {
                return Err(format!("{HEADER_SHAPE} holds arrays and nulls only, not {shape}"));
            };
            if depth > MAX_HEADER_SHAPE_DEPTH {
                return Err(format!("{HEADER_SHAPE} nests deeper than {MAX_HEADER_SHAPE_DEPTH}"));
            }
            pending.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    pending.push(',');
                }
                match item {
                    Value::Null => before.push(std::mem::take(pending)),
                    group => walk(group, depth + 1, pending, before)?,
                }
            }
            pending.push(']');
            Ok(())
        }
        let (mut pending, mut before) = (String::new(), Vec::new());
        walk(shape, 1, &mut pending, &mut before)?;
        if before.len() != size as usize {
            return Err(format!("{HEADER_SHAPE} has {} parts, but the chord has {size}", before.len()));
        }
        Ok(Self::Nested { before, after: pending })
    }
}

/// A chord's deadline, from its body's options ([`Signature::deadline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub seconds: u32,
    /// Fail the chord, with its errbacks, when the deadline passes.
    pub fail: bool,
}

/// A Celery signature, as a worker sends it in `request.chord`.
#[derive(Debug, Clone)]
pub struct Signature {
    pub task: String,
    pub task_id: TaskId,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: Map<String, Value>,
    pub immutable: bool,
    /// The signature as received.
    pub raw: Value,
}

impl Signature {
    /// Parses a callback signature; it must name its task and pre-assigned `options.task_id`.
    pub fn parse(json: &str) -> Result<Self, String> {
        let raw: Value = serde_json::from_str(json).map_err(|e| format!("callback is not JSON: {e}"))?;
        Self::from_value(raw, None)
    }

    /// Parses a signature; without `options.task_id`, `fallback_id` is used if given.
    pub fn from_value(raw: Value, fallback_id: Option<&str>) -> Result<Self, String> {
        let obj = raw.as_object().ok_or("callback must be a signature object")?;
        let task = obj.get("task").and_then(Value::as_str).filter(|t| !t.is_empty());
        let task = task.ok_or("callback needs a \"task\" name")?.to_owned();
        let options = match obj.get("options") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => return Err("callback options must be an object".into()),
        };
        match options.get("queue") {
            None | Some(Value::Null) => {}
            Some(Value::String(q)) if !q.is_empty() => {}
            Some(_) => return Err("callback options.queue must be a queue name or null".into()),
        }
        if !matches!(options.get("link_error"), None | Some(Value::Null | Value::Array(_) | Value::Object(_))) {
            return Err("callback options.link_error must be a signature, a list of them, or null".into());
        }
        let task_id = options
            .get("task_id")
            .and_then(Value::as_str)
            .or(fallback_id)
            .ok_or("callback needs options.task_id (Celery pre-assigns it)")?;
        let task_id = TaskId::parse(task_id).map_err(|e| format!("callback options.task_id: {e}"))?;
        let args = match obj.get("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err("callback args must be a list".into()),
        };
        let kwargs = match obj.get("kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(k)) => k.clone(),
            Some(_) => return Err("callback kwargs must be an object".into()),
        };
        let immutable = match obj.get("immutable") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("callback immutable must be true, false or null".into()),
        };
        Ok(Self { task, task_id, args, kwargs, options, immutable, raw })
    }

    /// The task messages Celery's `apply_async` of this signature sends when
    /// a chord calls it back, in order. The chord's results go first in each
    /// message's args, unless its task is immutable.
    /// - A task: itself.
    /// - A chain: its first task, carrying the rest of the chain in
    ///   `options.chain` (last task first, as the worker pops it).
    /// - A group: one message per member (a task or a chain), each with
    ///   its `group_id` and `group_index`, as `group.apply_async` sends them.
    /// - A chord: one message per header member (a task or a chain), each
    ///   carrying the chord's body, with `chord_size`, in `options.chord`, as
    ///   `chord.run` sends them; the worker reports each part, and the
    ///   inner chord is joined like any other.
    ///
    /// Members nest as Celery sends them: a chord inside a group or a
    /// header sends its own header's tasks (its body carries the outer
    /// group's id and index, or the outer chord); a chain that starts with a
    /// chord sends that chord, the rest going on from its body. What Celery
    /// never sends (a group inside a group or a header, which it flattens; a
    /// chain that starts with a group, which it makes a chord; an empty
    /// header) is refused here, so a chord part naming it is refused when
    /// first stored, never left to hang.
    pub fn body_messages(&self) -> Result<Vec<Signature>, String> {
        match self.task.as_str() {
            GROUP => {
                let tasks = list_of(&self.kwargs, "tasks", "a group")?;
                let group_id = Value::String(self.task_id.to_string());
                let mut messages = Vec::with_capacity(tasks.len());
                for (i, task) in tasks.iter().enumerate() {
                    let mut member = member(task).map_err(|e| format!("the group's task {i}: {e}"))?;
                    member.set_on_result_task("group_id", group_id.clone(), false);
                    member.set_on_result_task("group_index", json!(i), false);
                    messages.extend(member.messages()?);
                }
                if messages.is_empty() {
                    return Err("an empty group as a chord's body is not supported".into());
                }
                Ok(messages)
            }
            CHORD => {
                let (header, header_id) = match self.kwargs.get("header") {
                    Some(Value::Array(tasks)) => (tasks.clone(), self.task_id.to_string()),
                    Some(group @ Value::Object(_)) => {
                        let group = Signature::from_value(group.clone(), Some(self.task_id.as_str()))
                            .map_err(|e| format!("the chord's header: {e}"))?;
                        if group.task != GROUP {
                            return Err("a chord's header must be a group or a list of tasks".into());
                        }
                        (list_of(&group.kwargs, "tasks", "a chord's header")?.to_vec(), group.task_id.to_string())
                    }
                    _ => return Err("a chord needs kwargs.header".into()),
                };
                let mut body = self.kwargs.get("body").filter(|b| b.is_object()).cloned();
                let body = body.as_mut().ok_or("a chord needs kwargs.body, a signature")?;
                let inner = Signature::from_value(body.clone(), None).map_err(|e| format!("the chord's body: {e}"))?;
                inner.check_sendable().map_err(|e| format!("the chord's body: {e}"))?;
                // What our backend's apply_chord records, so each part reports the chord's size.
                body["chord_size"] = json!(header.len());
                // As chord.run does: the rest of a chain the chord is in
                // goes on from its body, which runs last (the worker that
                // ran the chord before it put it in the chord's options).
                let rest = self.options.get("chain").filter(|c| c.as_array().is_some_and(|c| !c.is_empty()));
                if let (Some(rest), Some(body)) = (rest, body.as_object_mut()) {
                    let options = body.entry("options").or_insert_with(|| json!({}));
                    if let Some(options) = options.as_object_mut() {
                        options.insert("chain".into(), rest.clone());
                    }
                }
                let extra = self.kwargs.get("kwargs").and_then(Value::as_object).cloned().unwrap_or_default();
                let mut messages = Vec::with_capacity(header.len());
                for (i, task) in header.iter().enumerate() {
                    let mut member = member(task).map_err(|e| format!("the chord's header task {i}: {e}"))?;
                    member.set_on_result_task("group_id", Value::String(header_id.clone()), false);
                    member.set_on_result_task("group_index", json!(i), true);
                    member.set_on_result_task("chord", body.clone(), true);
                    for mut message in member.messages()? {
                        for (k, v) in &extra {
                            message.kwargs.insert(k.clone(), v.clone());
                        }
                        messages.push(message);
                    }
                }
                if messages.is_empty() {
                    return Err("a chord with an empty header as a chord's body is not supported".into());
                }
                Ok(messages)
            }
            _ => self.clone().messages(),
        }
    }

    /// Whether dynachord can send this signature as a chord's body (see
    /// [`Signature::body_messages`]).
    pub fn check_sendable(&self) -> Result<(), String> {
        self.body_messages().map(|_| ())
    }

    /// The messages of a member of a body: a task; a chain sent as its
    /// first task carrying the rest, or, when it starts with a chord, as
    /// that chord with the rest going on from its body (`chord.run`); a
    /// chord inside a group or a header, as a chord body is sent. A group
    /// inside one is refused (Celery flattens those before they get here).
    fn messages(self) -> Result<Vec<Signature>, String> {
        match self.task.as_str() {
            CHAIN => {
                let tasks = list_of(&self.kwargs, "tasks", "a chain")?;
                let (first, rest) = tasks.split_first().ok_or("a chain needs at least one task")?;
                let mut first =
                    Signature::from_value(first.clone(), None).map_err(|e| format!("the chain's first task: {e}"))?;
                if [CHAIN, GROUP].contains(&first.task.as_str())
                    || (first.task == CHORD
                        && !rest.is_empty()
                        && first.options.get("chain").is_some_and(|c| !c.is_null()))
                {
                    return Err(format!(
                        "a chain that starts with a {} is not supported in a chord's body",
                        first.task
                    ));
                }
                if !rest.is_empty() {
                    first.options.insert("chain".into(), Value::Array(rest.iter().rev().cloned().collect()));
                }
                if first.task == CHORD {
                    return first.body_messages();
                }
                Ok(vec![first])
            }
            CHORD => self.body_messages(),
            GROUP => Err(format!("a {GROUP} inside a group or a chord's header is not supported in a chord's body")),
            _ => Ok(vec![self]),
        }
    }

    /// Sets an option on the task whose result stands for this signature:
    /// the task itself, or a chain's last task (Celery's `prepare_steps`
    /// gives `group_id`, `group_index` and `chord` to the last task only).
    fn set_on_result_task(&mut self, key: &str, value: Value, overwrite: bool) {
        fn options_of(sig: &mut Value) -> Option<&mut Map<String, Value>> {
            sig.as_object_mut()
                .map(|sig| sig.entry("options").or_insert_with(|| json!({})))
                .and_then(Value::as_object_mut)
        }
        fn last(tasks: Option<&mut Value>) -> Option<&mut Value> {
            tasks.and_then(Value::as_array_mut).and_then(|tasks| tasks.last_mut())
        }
        let options = match self.task.as_str() {
            CHAIN => last(self.kwargs.get_mut("tasks")).and_then(options_of),
            // A chord's result is its body's (a chain body's last task's), as
            // Celery's chord.freeze gives the body the group id and index.
            CHORD => match self.kwargs.get_mut("body") {
                Some(body) if body.get("task").and_then(Value::as_str) == Some(CHAIN) => {
                    last(body.pointer_mut("/kwargs/tasks")).and_then(options_of)
                }
                body => body.and_then(options_of),
            },
            _ => Some(&mut self.options),
        };
        if let Some(options) = options {
            if overwrite || options.get(key).is_none_or(Value::is_null) {
                options.insert(key.to_owned(), value);
            }
        }
    }

    /// The ids of the tasks that never run when this signature is not
    /// sent: its own and every task nested in it (the rest of its chain in
    /// `options.chain`, a chain's or a group's tasks, a chord's header and
    /// body). A failed chord stores its ChordError on each, as Celery's
    /// `chord_error_from_stack` and `_fail_chain` do for the callback and
    /// its chain, so nobody waits on them for ever.
    pub fn ids_that_never_run(&self) -> Vec<TaskId> {
        fn walk(sig: &Value, out: &mut Vec<TaskId>) {
            match sig {
                Value::Array(items) => items.iter().for_each(|item| walk(item, out)),
                Value::Object(_) => {
                    let id = sig.pointer("/options/task_id").and_then(Value::as_str);
                    out.extend(id.and_then(|id| TaskId::parse(id).ok()));
                    walk(sig.pointer("/options/chain").unwrap_or(&Value::Null), out);
                    if matches!(sig.get("task").and_then(Value::as_str), Some(CHAIN | GROUP | CHORD)) {
                        for nested in ["/kwargs/tasks", "/kwargs/header", "/kwargs/body"] {
                            walk(sig.pointer(nested).unwrap_or(&Value::Null), out);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut out = vec![self.task_id.clone()];
        walk(&self.raw, &mut out);
        // A message's own rest of the chain (set when a chain was sent as its first task).
        walk(self.options.get("chain").unwrap_or(&Value::Null), &mut out);
        out.sort();
        out.dedup();
        out
    }

    /// How many failed parts a chord whose body this is tolerates
    /// (`options.tolerated_failures`, a count, and
    /// `options.tolerated_failure_percentage`, 0 to 100, of `size`; set from
    /// Celery with `.set(...)`): the least of those given, 0 when neither is.
    /// An `Err` says which is malformed.
    pub fn tolerated_failures(&self, size: u32) -> Result<u32, String> {
        let count = match self.options.get(TOLERATED_FAILURES) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                crate::whole::as_u64(v)
                    .filter(|n| *n <= u64::from(u32::MAX))
                    .ok_or_else(|| format!("{TOLERATED_FAILURES} must be a whole number of parts, not {v}"))?
                    as u32,
            ),
        };
        let share = match self.options.get(TOLERATED_FAILURE_PERCENTAGE) {
            None | Some(Value::Null) => None,
            Some(v) => {
                let pct = v
                    .as_f64()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| format!("{TOLERATED_FAILURE_PERCENTAGE} must be a number from 0 to 100, not {v}"))?;
                Some((f64::from(size) * pct / 100.0).floor() as u32)
            }
        };
        Ok(match (count, share) {
            (Some(a), Some(b)) => a.min(b),
            (one, other) => one.or(other).unwrap_or(0),
        })
    }

    /// Whether the chord's parts' results are to be forgotten once this
    /// body has been sent (`options.forget_parts`, set from Celery with
    /// `.set(forget_parts=True)`). An `Err` when it is not a boolean.
    pub fn forgets_parts(&self) -> Result<bool, String> {
        match self.options.get(FORGET_PARTS) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(yes)) => Ok(*yes),
            Some(v) => Err(format!("{FORGET_PARTS} must be true or false, not {v}")),
        }
    }

    /// How the results of a chord of `size` parts whose body this is are
    /// laid out: one list, or nested as `options.dynachord_header_shape`
    /// says ([`HEADER_SHAPE`]). An `Err` says how the shape is malformed.
    pub fn results_layout(&self, size: u32) -> Result<ResultsLayout, String> {
        match self.options.get(HEADER_SHAPE) {
            None | Some(Value::Null) => Ok(ResultsLayout::Flat),
            Some(shape) => ResultsLayout::nested(shape, size),
        }
    }

    /// The chord's deadline, if its body carries one (`options.deadline_seconds`,
    /// a whole number from 1 to [`MAX_DEADLINE_SECONDS`], and
    /// `options.fail_at_deadline`, a boolean; set from Celery with
    /// `.set(...)`). An `Err` says which is malformed.
    pub fn deadline(&self) -> Result<Option<Deadline>, String> {
        let fail = match self.options.get(FAIL_AT_DEADLINE) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(yes)) => *yes,
            Some(v) => return Err(format!("{FAIL_AT_DEADLINE} must be true or false, not {v}")),
        };
        let seconds = match self.options.get(DEADLINE_SECONDS) {
            None | Some(Value::Null) if fail => return Err(format!("{FAIL_AT_DEADLINE} needs {DEADLINE_SECONDS}")),
            None | Some(Value::Null) => return Ok(None),
            Some(v) => crate::whole::as_u64(v).filter(|n| (1..=MAX_DEADLINE_SECONDS).contains(n)).ok_or_else(|| {
                format!(
                    "{DEADLINE_SECONDS} must be a whole number of seconds from 1 to {MAX_DEADLINE_SECONDS}, not {v}"
                )
            })?,
        };
        Ok(Some(Deadline { seconds: seconds as u32, fail }))
    }

    /// The queue this signature names (`options.queue`), if any.
    pub fn queue(&self) -> Option<&str> {
        self.options.get("queue").and_then(Value::as_str)
    }

    /// The errbacks (`options.link_error`): one signature or a list of them.
    pub fn errbacks(&self) -> Vec<Value> {
        match self.options.get("link_error") {
            Some(Value::Array(list)) => list.clone(),
            Some(one @ Value::Object(_)) => vec![one.clone()],
            _ => Vec::new(),
        }
    }

    /// A group's members (each a task, or a chain whose id is its last
    /// task's); nothing for any other signature.
    pub fn group_members(&self) -> Vec<Signature> {
        if self.task != GROUP {
            return Vec::new();
        }
        let tasks = self.kwargs.get("tasks").and_then(Value::as_array);
        tasks.map(|tasks| tasks.iter().filter_map(|t| member(t).ok()).collect()).unwrap_or_default()
    }

    /// The errbacks a failed chord with this body calls, in order, as
    /// Celery 5.7's `chord_error_from_stack` calls them: a task's or a
    /// chain's own, each reporting the body's failure; for a group, each
    /// member's own and then the group's (where `group.on_error` does not
    /// already put them on every member), without repeats, each reporting
    /// that member's failure.
    pub fn errback_calls(&self) -> Vec<ErrbackCall> {
        if self.task != GROUP {
            return self.errbacks().into_iter().map(|errback| ErrbackCall { failed: self.clone(), errback }).collect();
        }
        let group = self.errbacks();
        let mut calls = Vec::new();
        for member in self.group_members() {
            let mut seen: Vec<Value> = Vec::new();
            for errback in member.errbacks().into_iter().chain(group.iter().cloned()) {
                if !seen.contains(&errback) {
                    seen.push(errback.clone());
                    calls.push(ErrbackCall { failed: member.clone(), errback });
                }
            }
        }
        calls
    }

    /// Every queue named anywhere in this signature: its own `options.queue`
    /// and that of every signature nested in it (errbacks, links, a chain's
    /// rest, a group's tasks, a chord's body), wherever it sits.
    pub fn queues_named(&self) -> Vec<String> {
        fn walk(value: &Value, out: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(q)) = map.get("options").and_then(|o| o.get("queue")) {
                        out.push(q.clone());
                    }
                    map.values().for_each(|v| walk(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.raw, &mut out);
        out.sort();
        out.dedup();
        out
    }
}

/// One errback call of a failed chord: the errback's signature, and the
/// task whose failure it reports (Celery's request of that call).
pub struct ErrbackCall {
    pub failed: Signature,
    pub errback: Value,
}

/// `kwargs[key]`, a list of signatures (`what` names the canvas in errors).
fn list_of<'a>(kwargs: &'a Map<String, Value>, key: &str, what: &str) -> Result<&'a [Value], String> {
    kwargs.get(key).and_then(Value::as_array).map(Vec::as_slice).ok_or_else(|| format!("{what} needs kwargs.{key}"))
}

/// A member of a group or a chord's header. A chain's id is its last
/// task's, as Celery's chain result is.
fn member(raw: &Value) -> Result<Signature, String> {
    let last = raw.pointer("/kwargs/tasks").and_then(Value::as_array).and_then(|tasks| tasks.last());
    let last_id = last.and_then(|t| t.pointer("/options/task_id")).and_then(Value::as_str);
    Signature::from_value(raw.clone(), last_id)
}

/// Celery's ChordError text for the first failed part: `Dependency <id> raised <repr>`.
pub fn chord_error_message(task_id: &TaskId, meta_json: &str) -> String {
    let meta: Value = serde_json::from_str(meta_json).unwrap_or(Value::Null);
    let result = &meta["result"];
    let exc_type = result["exc_type"].as_str().unwrap_or(match meta["status"].as_str() {
        Some("REVOKED") => "TaskRevokedError",
        _ => "Exception",
    });
    let args = match &result["exc_message"] {
        Value::Array(items) => items.iter().map(py_repr).collect::<Vec<_>>().join(", "),
        Value::Null => String::new(),
        other => py_repr(other),
    };
    format!("Dependency {task_id} raised {exc_type}({args})")
}

/// Python's `repr` of a JSON value, as Celery's `argsrepr`/`kwargsrepr` and
/// exception reprs show it.
pub fn py_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_str(s),
        Value::Array(items) => format!("[{}]", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("{}: {}", py_str(k), py_repr(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A tuple's repr: `(1,)` for one item, `(1, 2)` for more.
pub fn py_tuple(items: &[Value]) -> String {
    match items {
        [one] => format!("({},)", py_repr(one)),
        _ => format!("({})", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
    }
}

fn py_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// What a task message needs beyond the signature.
pub struct MessageContext<'a> {
    /// The header group's id (the chord's id).
    pub group_id: &'a str,
    /// The last header task.
    pub parent_id: Option<&'a str>,
    pub root_id: Option<&'a str>,
    /// On an errback of a failed chord only: the failed callback and its
    /// error, sent in the [`CHORD_ERROR_HEADER`] header, from which the
    /// Python package calls a new-style errback (`request, exc, traceback`)
    /// as Celery's own backends do.
    pub chord_error: Option<&'a Value>,
}

/// The message header that marks an errback sent for a failed chord (see
/// [`MessageContext::chord_error`]): `id`, `task`, `args` and `kwargs` of the
/// task whose failure it reports (the callback, or a group body's task), its
/// `errbacks`, the errback's `immutable`, and `exc`, the exception (the
/// ChordError, or for a group body's task the failed part's own) as Celery
/// serializes exceptions.
pub const CHORD_ERROR_HEADER: &str = "dynachord_chord_error";

/// The message header (and signature option) that marks a chord part a
/// redrive sends again: the redrive's number. The Python package's run-once
/// guard then claims the part over its FAILURE (never over a SUCCESS).
pub const REDRIVE_HEADER: &str = "dynachord_redrive";

/// The SQS message body of a Celery protocol-2 task message for `sig` with
/// `args` (a JSON array, already including the chord results when there are
/// any): base64 of kombu's JSON envelope, whose `body` is base64 of
/// `[args, kwargs, embed]`.
pub fn celery_sqs_body(sig: &Signature, args: &str, queue: &str, cx: &MessageContext<'_>) -> String {
    let kwargs = Value::Object(sig.kwargs.clone());
    let option = |name: &str| sig.options.get(name).cloned().unwrap_or(Value::Null);
    // As Celery's apply_async hands them to amqp.as_task_v2: link and
    // link_error become lists, the rest of a chain and an enclosing chord
    // travel as they are, so the worker carries the canvas on.
    let list = |name: &str| match option(name) {
        Value::Null => Value::Null,
        Value::Array(items) => Value::Array(items),
        one => Value::Array(vec![one]),
    };
    let embed = json!({
        "callbacks": list("link"),
        "errbacks": list("link_error"),
        "chain": option("chain"),
        "chord": option("chord"),
    });
    // args stays raw JSON text so results round-trip exactly.
    let body = format!("[{args},{kwargs},{embed}]");
    let args_value: Vec<Value> = serde_json::from_str(args).unwrap_or_default();
    let task_id = sig.task_id.as_str();
    // A message outside any group (the processing cache's) has no group header.
    let group = sig.options.get("group_id").and_then(Value::as_str).unwrap_or(cx.group_id);
    let group = if group.is_empty() { Value::Null } else { Value::from(group) };
    // As amqp.as_task_v2 turns them into headers: a countdown becomes an
    // eta, a relative expires an absolute one.
    let eta = match option("eta") {
        Value::String(at) => Value::String(at),
        _ => option("countdown").as_f64().map_or(Value::Null, |s| celery_datetime_in(s).into()),
    };
    let expires = match option("expires") {
        Value::Number(s) => s.as_f64().map_or(Value::Null, |s| celery_datetime_in(s).into()),
        at @ Value::String(_) => at,
        _ => Value::Null,
    };
    // Stamps (Celery's stamping visitors) as amqp.as_task_v2 writes them:
    // the names in `stamped_headers`, each one's value from the options.
    let stamped_headers = option("stamped_headers");
    let stamps: Map<String, Value> = match &stamped_headers {
        Value::Array(names) => names.iter().filter_map(Value::as_str).map(|h| (h.to_owned(), option(h))).collect(),
        _ => Map::new(),
    };
    let mut envelope = json!({
        "body": B64.encode(body.as_bytes()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": sig.task,
            "id": task_id,
            "shadow": option("shadow"),
            "eta": eta,
            "expires": expires,
            "group": group,
            "group_index": option("group_index"),
            "retries": 0,
            "timelimit": [option("time_limit"), option("soft_time_limit")],
            "root_id": sig.options.get("root_id").and_then(Value::as_str).or(cx.root_id),
            "parent_id": sig.options.get("parent_id").and_then(Value::as_str).or(cx.parent_id),
            "argsrepr": py_tuple(&args_value),
            "kwargsrepr": py_repr(&kwargs),
            "origin": "dynachord@chord-join",
            "ignore_result": sig.options.get("ignore_result").and_then(Value::as_bool).unwrap_or(false),
            "replaced_task_nesting": 0,
            "stamped_headers": stamped_headers,
            "stamps": stamps,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": option("reply_to"),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    });
    if let Some(info) = cx.chord_error {
        envelope["headers"][CHORD_ERROR_HEADER] = info.clone();
    }
    if let Some(redrive) = sig.options.get(REDRIVE_HEADER) {
        envelope["headers"][REDRIVE_HEADER] = redrive.clone();
    }
    B64.encode(envelope.to_string().as_bytes())
}

/// kombu's SQS queue naming: `.` becomes `-`, other punctuation but `-` and
/// `_` becomes `_`.
pub fn kombu_queue_name(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' => '-',
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => c,
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {

    fn layout(shape: &str, size: u32) -> Result<ResultsLayout, String> {
        let shape = if shape.is_empty() { String::new() } else { format!(r#","{HEADER_SHAPE}":{shape}"#) };
        let options = format!(r#"{{"task_id":"cb"{shape}}}"#);
        Signature::parse(&format!(r#"{{"task":"t.cb","options":{options}}}"#)).unwrap().results_layout(size)
    }

    /// Joins results 0..n as a layout lays them out.
    fn laid_out(layout: &ResultsLayout, n: usize) -> String {
        let mut out: String = (0..n).map(|i| format!("{}{i}", layout.before(i))).collect();
        out.push_str(layout.after());
        out
    }

    #[test]
    fn a_header_shape_nests_the_results_and_a_malformed_one_is_refused() {
        assert_eq!(layout("", 3).unwrap(), ResultsLayout::Flat);
        assert_eq!(laid_out(&layout("null", 3).unwrap(), 3), "[0,1,2]");
        assert_eq!(laid_out(&layout("[null,[null,null],null]", 4).unwrap(), 4), "[0,[1,2],3]");
        assert_eq!(laid_out(&layout("[[null,[null,null]]]", 3).unwrap(), 3), "[[0,[1,2]]]");
        // An empty group keeps its place.
        assert_eq!(laid_out(&layout("[null,[],[null]]", 2).unwrap(), 2), "[0,[],[1]]");
        let deep = format!("{}null{}", "[".repeat(MAX_HEADER_SHAPE_DEPTH), "]".repeat(MAX_HEADER_SHAPE_DEPTH));
        assert_eq!(laid_out(&layout(&deep, 1).unwrap(), 1), deep.replace("null", "0"));
        for (shape, size, why) in [
            ("[null,[null,null]]", 2, "has 3 parts, but the chord has 2"),
            ("[null,1]", 2, "arrays and nulls only, not 1"),
            ("{}", 1, "arrays and nulls only"),
            ("[]", 1, "has 0 parts"),
        ] {
            let err = layout(shape, size).unwrap_err();
            assert!(err.contains(why), "{shape}: {err}");
        }
        let deeper = format!("[{deep}]");
        assert!(layout(&deeper, 1).unwrap_err().contains("nests deeper than 32"));
    }
    use super::*;

    #[test]
    fn chord_errors_read_like_celerys() {
        let id = TaskId::parse("t2").unwrap();
        let meta = r#"{"status":"FAILURE","result":{"exc_type":"ValueError","exc_message":["boom",42],"exc_module":"builtins"}}"#;
        assert_eq!(chord_error_message(&id, meta), "Dependency t2 raised ValueError('boom', 42)");
        let revoked = r#"{"status":"REVOKED","result":{"exc_type":"TaskRevokedError","exc_message":["revoked"],"exc_module":"celery.exceptions"}}"#;
        assert_eq!(chord_error_message(&id, revoked), "Dependency t2 raised TaskRevokedError('revoked')");
    }

    #[test]
    fn signatures_need_a_task_and_a_task_id() {
        let sig =
            Signature::parse(r#"{"task":"t.sum","args":[1],"kwargs":{},"options":{"task_id":"cb"},"immutable":true}"#)
                .unwrap();
        assert_eq!((sig.task.as_str(), sig.task_id.as_str(), sig.immutable), ("t.sum", "cb", true));
        assert!(Signature::parse(r#"{"task":"t"}"#).is_err());
        assert!(Signature::parse(r#"{"options":{"task_id":"cb"}}"#).is_err());
        assert!(Signature::parse(r#"{"task":"t","options":{"task_id":"a/b"}}"#).is_err());
        assert!(Signature::from_value(json!({"task": "e"}), Some("x")).is_ok());
    }

    #[test]
    fn signature_fields_of_the_wrong_type_are_refused() {
        let with = |extra: Value| {
            let mut sig = json!({"task": "t", "options": {"task_id": "cb"}});
            for (k, v) in extra.as_object().unwrap() {
                if k == "queue" || k == "link_error" {
                    sig["options"][k] = v.clone();
                } else {
                    sig[k] = v.clone();
                }
            }
            Signature::from_value(sig, None)
        };
        for bad in [
            json!({"task": ""}),
            json!({"immutable": {}}),
            json!({"immutable": "yes"}),
            json!({"args": {}}),
            json!({"kwargs": []}),
            json!({"queue": ""}),
            json!({"queue": 7}),
            json!({"link_error": "x"}),
        ] {
            assert!(with(bad.clone()).is_err(), "{bad} must be refused");
        }
        for good in [
            json!({"immutable": null}),
            json!({"queue": "q"}),
            json!({"queue": null}),
            json!({"link_error": [{"task": "e"}]}),
        ] {
            assert!(with(good.clone()).is_ok(), "{good} must be accepted");
        }
    }

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr(&json!(["boom", 42, null, true, 1.5])), "['boom', 42, None, True, 1.5]");
        assert_eq!(py_repr(&json!("it's")), "\"it's\"");
        assert_eq!(py_repr(&json!("a'b\"c\n")), "'a\\'b\"c\\n'");
        assert_eq!(py_repr(&json!({"a": [1]})), "{'a': [1]}");
        assert_eq!(py_tuple(&[json!([1, 2])]), "([1, 2],)");
        assert_eq!(py_tuple(&[json!(1), json!("x")]), "(1, 'x')");
        assert_eq!(py_tuple(&[]), "()");
    }

    #[test]
    fn kombu_names_queues_like_kombu() {
        assert_eq!(kombu_queue_name("proj.high"), "proj-high");
        assert_eq!(kombu_queue_name("a b/c_d-e"), "a_b_c_d-e");
    }

    #[test]
    fn the_sqs_body_is_kombus_envelope_around_celerys_message() {
        let sig = Signature::parse(
            r#"{"task":"proj.tasks.tsum","args":[7],"kwargs":{"k":1},"options":{"task_id":"cb-id","reply_to":"oid","group_id":"g1","link_error":[{"task":"proj.err"}]},"subtask_type":null,"immutable":false}"#,
        )
        .unwrap();
        let cx = MessageContext { group_id: "g1", parent_id: Some("t3"), root_id: None, chord_error: None };
        let body = celery_sqs_body(&sig, r#"[[1,2,123456789012345678901234567890],7]"#, "celery", &cx);
        let envelope: Value = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        let headers = &envelope["headers"];
        assert_eq!((headers["task"].as_str(), headers["id"].as_str()), (Some("proj.tasks.tsum"), Some("cb-id")));
        assert_eq!(headers["group"], "g1");
        assert_eq!(headers["parent_id"], "t3");
        assert_eq!(headers["kwargsrepr"], "{'k': 1}");
        assert_eq!(envelope["properties"]["reply_to"], "oid");
        assert_eq!(envelope["properties"]["delivery_info"]["routing_key"], "celery");
        assert_eq!(envelope["properties"]["body_encoding"], "base64");
        assert_eq!(envelope["content-type"], "application/json");
        let inner = String::from_utf8(B64.decode(envelope["body"].as_str().unwrap()).unwrap()).unwrap();
        assert!(
            inner.starts_with("[[[1,2,123456789012345678901234567890],7],{\"k\":1},"),
            "results stay exact: {inner}"
        );
        let inner: Value = serde_json::from_str(&inner).unwrap();
        assert_eq!(inner[2]["errbacks"], json!([{"task": "proj.err"}]));
        assert_eq!(inner[2]["chord"], Value::Null);
        assert!(headers.get(CHORD_ERROR_HEADER).is_none(), "only an errback of a failed chord carries it");
        assert_eq!((headers["stamped_headers"].clone(), headers["stamps"].clone()), (Value::Null, json!({})));

        let failed = json!({"id": "cb-id", "exc": {"exc_type": "ChordError"}});
        let cx = MessageContext { chord_error: Some(&failed), ..cx };
        let envelope: Value =
            serde_json::from_slice(&B64.decode(celery_sqs_body(&sig, "[]", "q", &cx)).unwrap()).unwrap();
        assert_eq!(envelope["headers"][CHORD_ERROR_HEADER], failed);
    }

    /// A signature stamped with Celery's visitor API (`sig.stamp(visitor)`)
    /// carries its stamps into the message's headers, as apply_async does.
    #[test]
    fn a_stamped_signatures_stamps_reach_the_message_headers() {
        let sig = Signature::parse(
            r#"{"task":"t.sum","options":{"task_id":"s1","stamped_headers":["on_signature","flow"],
                "on_signature":42,"flow":["a","b"]}}"#,
        )
        .unwrap();
        let cx = MessageContext { group_id: "g1", parent_id: None, root_id: None, chord_error: None };
        let envelope: Value =
            serde_json::from_slice(&B64.decode(celery_sqs_body(&sig, "[]", "q", &cx)).unwrap()).unwrap();
        assert_eq!(envelope["headers"]["stamped_headers"], json!(["on_signature", "flow"]));
        assert_eq!(envelope["headers"]["stamps"], json!({"on_signature": 42, "flow": ["a", "b"]}));
    }

    #[test]
    fn the_message_carries_the_canvas_on_as_celerys_apply_async_does() {
        // The body of a chord that is itself part of an outer chord, with
        // the rest of a chain and a link after it.
        let sig = Signature::parse(
            r#"{"task":"t.cb","args":[],"kwargs":{},"immutable":false,"options":{"task_id":"cb","group_id":"outer",
                "group_index":2,"chord":{"task":"t.outer","options":{"task_id":"ocb"}},
                "chain":[{"task":"t.last","options":{"task_id":"n2"}},{"task":"t.next","options":{"task_id":"n1"}}],
                "link":{"task":"t.linked","options":{"task_id":"l1"}},"time_limit":30}}"#,
        )
        .unwrap();
        let cx = MessageContext { group_id: "inner", parent_id: Some("p"), root_id: None, chord_error: None };
        let envelope: Value =
            serde_json::from_slice(&B64.decode(celery_sqs_body(&sig, "[[1]]", "celery", &cx)).unwrap()).unwrap();
        let headers = &envelope["headers"];
        assert_eq!((headers["group"].as_str(), headers["group_index"].as_u64()), (Some("outer"), Some(2)));
        assert_eq!(headers["timelimit"], json!([30, null]));
        let body: Value = serde_json::from_slice(&B64.decode(envelope["body"].as_str().unwrap()).unwrap()).unwrap();
        let embed = &body[2];
        assert_eq!(embed["chain"][1]["task"], "t.next", "the rest of the chain, last task first");
        assert_eq!(embed["chord"]["task"], "t.outer", "the enclosing chord");
        assert_eq!(embed["callbacks"], json!([{"task": "t.linked", "options": {"task_id": "l1"}}]), "link as a list");
        assert_eq!(embed["errbacks"], Value::Null);
        assert_eq!((headers["eta"].clone(), headers["expires"].clone()), (Value::Null, Value::Null));
    }

    #[test]
    fn a_countdown_and_a_relative_expiry_become_absolute_as_celery_sends_them() {
        let header = |options: &str| {
            let sig = Signature::parse(&format!(r#"{{"task":"t.a","options":{{"task_id":"a",{options}}}}}"#)).unwrap();
            let cx = MessageContext { group_id: "g", parent_id: None, root_id: None, chord_error: None };
            let envelope: Value =
                serde_json::from_slice(&B64.decode(celery_sqs_body(&sig, "[]", "celery", &cx)).unwrap()).unwrap();
            (envelope["headers"]["eta"].clone(), envelope["headers"]["expires"].clone())
        };
        let (eta, expires) = header(r#""countdown":60,"expires":3600"#);
        let (eta, expires) = (eta.as_str().unwrap().to_owned(), expires.as_str().unwrap().to_owned());
        let now = crate::time::now_celery();
        assert!(eta > now && expires > eta && eta.ends_with("+00:00"), "{now} < {eta} < {expires}");
        let at = "2030-01-01T00:00:00+00:00";
        assert_eq!(
            header(&format!(r#""eta":"{at}","expires":"{at}""#)),
            (json!(at), json!(at)),
            "absolute ones pass as they are"
        );
    }

    #[test]
    fn every_queue_a_signature_names_is_found() {
        let sig = Signature::parse(
            r#"{"task":"t","options":{"task_id":"cb","queue":"q1","link_error":[{"task":"e","options":{"queue":"q2"}}],
                "chain":[{"task":"n","options":{"queue":"q3"}}]},"kwargs":{"tasks":[{"task":"g","options":{"queue":"q4"}}]}}"#,
        )
        .unwrap();
        assert_eq!(sig.queues_named(), ["q1", "q2", "q3", "q4"]);
        assert_eq!(sig.queue(), Some("q1"));
        assert_eq!(sig.errbacks().len(), 1);
    }

    fn messages(json: &str) -> Vec<Signature> {
        Signature::parse(json).unwrap().body_messages().unwrap()
    }

    #[test]
    fn a_chain_is_sent_as_its_first_task_carrying_the_rest() {
        let chain = r#"{"task":"celery.chain","args":[],"kwargs":{"tasks":[
                {"task":"t.a","args":[1],"options":{"task_id":"a"}},
                {"task":"t.b","options":{"task_id":"b"}},
                {"task":"t.c","options":{"task_id":"c"}}]},"options":{"task_id":"c"},"subtask_type":"chain"}"#;
        let sent = messages(chain);
        assert_eq!(sent.len(), 1);
        let first = &sent[0];
        assert_eq!((first.task.as_str(), first.task_id.as_str(), first.args.clone()), ("t.a", "a", vec![json!(1)]));
        let rest: Vec<&str> =
            first.options["chain"].as_array().unwrap().iter().map(|t| t["task"].as_str().unwrap()).collect();
        assert_eq!(rest, ["t.c", "t.b"], "last task first");
        let task = messages(r#"{"task":"t.a","options":{"task_id":"a"}}"#);
        assert_eq!((task.len(), task[0].task.as_str(), task[0].options.get("chain")), (1, "t.a", None));
    }

    /// A group body as Celery 5.7's chord.run freezes it (see
    /// `docs/CELERY_WIRE.md`): each task keeps its frozen group_id and index.
    #[test]
    fn a_group_body_is_one_message_per_task() {
        let group = r#"{"task":"celery.group","args":[],"kwargs":{"tasks":[
            {"task":"t.sum","args":[],"kwargs":{},"options":{"task_id":"g0","group_id":"hdr","group_index":0}},
            {"task":"t.sum","args":[],"kwargs":{"k":1},"options":{"task_id":"g1","group_id":"hdr","group_index":1}},
            {"task":"celery.chain","kwargs":{"tasks":[{"task":"t.a","options":{"task_id":"c0"}},
                {"task":"t.b","options":{"task_id":"c1"}}]},"options":{}}]},
            "options":{"task_id":"grp","group_id":"hdr"},"subtask_type":"group"}"#;
        let sent = messages(group);
        let got: Vec<(&str, &str, Value, Value)> = sent[..2]
            .iter()
            .map(|m| {
                (m.task.as_str(), m.task_id.as_str(), m.options["group_id"].clone(), m.options["group_index"].clone())
            })
            .collect();
        assert_eq!(
            got[..2],
            [("t.sum", "g0", json!("hdr"), json!(0)), ("t.sum", "g1", json!("hdr"), json!(1))],
            "frozen options are kept"
        );
        // A chain in the group: its first task goes, its last reports as the group's member.
        let chain = &sent[2];
        assert_eq!((chain.task.as_str(), chain.task_id.as_str()), ("t.a", "c0"));
        let last = &chain.options["chain"][0];
        assert_eq!(
            (last["options"]["group_id"].clone(), last["options"]["group_index"].clone()),
            (json!("grp"), json!(2))
        );
        let ids: Vec<String> =
            Signature::parse(group).unwrap().ids_that_never_run().iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, ["c0", "c1", "g0", "g1", "grp"]);
        let ids: Vec<String> = chain.ids_that_never_run().iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, ["c0", "c1"], "a chain's message stands for the whole chain");
    }

    /// `chain(a, group, group, b)`: Celery makes the first group a chord
    /// whose body is the second group's chord, and the worker that runs it
    /// puts the rest of the chain in that body's options. Sent as a body,
    /// the inner chord passes the rest on to its own body, as chord.run
    /// does, so the chain goes on after it.
    #[test]
    fn a_chord_body_passes_the_rest_of_its_chain_to_its_own_body() {
        let chord = r#"{"task":"celery.chord","args":[],"kwargs":{"kwargs":{},
            "header":{"task":"celery.group","args":[],"kwargs":{"tasks":[
                {"task":"t.sum","options":{"task_id":"h0","group_index":0}}]},
                "options":{"task_id":"inner"},"subtask_type":"group"},
            "body":{"task":"t.sum","args":[],"kwargs":{},"options":{"task_id":"cb2"}}},
            "options":{"task_id":"inner","chain":[{"task":"t.add","args":[1],"options":{"task_id":"last"}}]},
            "subtask_type":"chord"}"#;
        let sent = messages(chord);
        let body = &sent[0].options["chord"];
        assert_eq!(body["options"]["task_id"], json!("cb2"));
        assert_eq!(body["options"]["chain"][0]["options"]["task_id"], json!("last"), "{body}");
        assert_eq!(sent[0].options.get("chain"), None, "never to the header's tasks");
    }

    /// A chord body as Celery 5.7's chord.run freezes it: the header is a
    /// group whose tasks carry only their index.
    #[test]
    fn a_chord_body_sends_its_header_each_carrying_the_inner_body_and_its_size() {
        let chord = r#"{"task":"celery.chord","args":[],"kwargs":{"kwargs":{"extra":true},
            "header":{"task":"celery.group","args":[],"kwargs":{"tasks":[
                {"task":"t.sum","args":[],"kwargs":{},"options":{"task_id":"h0","group_index":0}},
                {"task":"t.sum","args":[5],"kwargs":{"k":1},"options":{"task_id":"h1","group_index":1}},
                {"task":"celery.chain","kwargs":{"tasks":[{"task":"t.a","options":{"task_id":"c0"}},
                    {"task":"t.b","options":{"task_id":"c1"}}]},"options":{}}]},
                "options":{"task_id":"inner","root_id":null,"parent_id":null},"subtask_type":"group"},
            "body":{"task":"t.sum","args":[],"kwargs":{},"options":{"task_id":"cb2","group_id":"outer"}}},
            "options":{"task_id":"inner"},"subtask_type":"chord"}"#;
        let sent = messages(chord);
        assert_eq!(sent.len(), 3);
        for (i, m) in sent[..2].iter().enumerate() {
            assert_eq!(m.options["group_id"], json!("inner"));
            assert_eq!(m.options["group_index"], json!(i));
            assert_eq!(m.options["chord"]["options"]["task_id"], json!("cb2"));
            assert_eq!(m.options["chord"]["chord_size"], json!(3), "what each part reports");
            assert_eq!(m.kwargs["extra"], json!(true), "the chord's kwargs go to every header task");
        }
        assert_eq!(sent[1].args, vec![json!(5)]);
        let last = &sent[2].options["chain"][0]["options"];
        assert_eq!((last["group_index"].clone(), last["chord"]["chord_size"].clone()), (json!(2), json!(3)));
        assert!(sent[2].options.get("chord").is_none(), "only the chain's last task reports to the chord");
        let ids: Vec<String> =
            Signature::parse(chord).unwrap().ids_that_never_run().iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, ["c0", "c1", "cb2", "h0", "h1", "inner"]);
    }

    #[test]
    fn bodies_dynachord_cannot_send_are_refused_with_the_reason() {
        let task = |id: &str| format!(r#"{{"task":"t.a","options":{{"task_id":"{id}"}}}}"#);
        let group = |tasks: &str| {
            format!(r#"{{"task":"celery.group","kwargs":{{"tasks":[{tasks}]}},"options":{{"task_id":"g"}}}}"#)
        };
        let chord = |header: &str, body: &str| {
            format!(
                r#"{{"task":"celery.chord","kwargs":{{"header":[{header}],"body":{body}}},"options":{{"task_id":"c"}}}}"#
            )
        };
        for (refused, why) in [
            (group(""), "empty group"),
            (group(&group(&task("a"))), "celery.group inside a group"),
            (chord(&group(&task("a")), &task("b")), "celery.group inside a group or a chord's header"),
            (chord("", &task("b")), "empty header"),
            (chord(&task("a"), "null"), "needs kwargs.body"),
            (chord(&task("a"), &group("")), "the chord's body: an empty group"),
            (r#"{"task":"celery.chord","kwargs":{},"options":{"task_id":"g"}}"#.into(), "needs kwargs.header"),
            (r#"{"task":"celery.chain","kwargs":{"tasks":[]},"options":{"task_id":"g"}}"#.into(), "at least one task"),
            (
                format!(
                    r#"{{"task":"celery.chain","kwargs":{{"tasks":[{}]}},"options":{{"task_id":"x"}}}}"#,
                    group(&task("a"))
                ),
                "starts with a celery.group",
            ),
        ] {
            let err = Signature::parse(&refused).unwrap().check_sendable().unwrap_err();
            assert!(err.contains(why), "{refused}: {err}");
        }
        // A chord as the body of a chord's body: each level is joined in turn.
        let nested = chord(&task("a"), &chord(&task("b"), &group(&task("c"))));
        assert!(Signature::parse(&nested).unwrap().check_sendable().is_ok());
        // A chord in a group body: its header's tasks go out, its body
        // carrying the group's id and index as Celery's chord.freeze sets them.
        let body = group(&format!("{},{}", chord(&task("a"), &task("b")), task("t")));
        let messages = Signature::parse(&body).unwrap().body_messages().unwrap();
        let ids: Vec<&str> = messages.iter().map(|m| m.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "t"]);
        let inner = &messages[0].options["chord"]["options"];
        assert_eq!(
            (&inner["task_id"], &inner["group_id"], &inner["group_index"]),
            (&json!("b"), &json!("g"), &json!(0))
        );
        assert_eq!((&messages[0].options["group_id"], &messages[1].options["group_index"]), (&json!("c"), &json!(1)));
        // A chain that starts with a chord: the rest goes on from the chord's body.
        let chain = format!(
            r#"{{"task":"celery.chain","kwargs":{{"tasks":[{},{},{}]}},"options":{{"task_id":"x"}}}}"#,
            chord(&task("a"), &task("b")),
            task("c"),
            task("d")
        );
        let messages = Signature::parse(&chain).unwrap().body_messages().unwrap();
        assert_eq!(messages.len(), 1);
        let rest: Vec<&str> = messages[0].options["chord"]["options"]["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["options"]["task_id"].as_str().unwrap())
            .collect();
        assert_eq!(rest, ["d", "c"], "last task first, as the worker pops it");
    }

    #[test]
    fn a_failed_chord_fails_the_rest_of_its_chain_too() {
        let sig = Signature::parse(
            r#"{"task":"celery.chain","kwargs":{"tasks":[{"task":"t.a","options":{"task_id":"a"}},
                {"task":"t.b","options":{"task_id":"b"}}]},
                "options":{"task_id":"b","chain":[{"task":"t.z","options":{"task_id":"z"}}]}}"#,
        )
        .unwrap();
        let ids: Vec<String> = sig.ids_that_never_run().iter().map(|id| id.to_string()).collect();
        assert_eq!(ids, ["a", "b", "z"]);
    }
}
