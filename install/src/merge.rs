//! Pure text transforms of CNI config files: classify, insert our entry, convert a single-plugin
//! `.conf` into a conflist, remove our entry. Edits are byte splices: everything we do not
//! touch stays byte-for-byte as the file's owner wrote it, and `remove(insert(x)) == x`.

use std::ops::Range;

use serde_json::ser::PrettyFormatter;
use serde_json::{Serializer, Value};

use crate::entry::PluginEntry;
use crate::json_span::{array_elements, object_members, value_span, Member, SpanError};

/// cniVersion used when wrapping a `.conf` that has none (or one too old to chain).
pub const FALLBACK_CNI_VERSION: &str = "0.3.1";
/// Network name used when wrapping a `.conf` that has none (Istio's choice).
pub const FALLBACK_NETWORK_NAME: &str = "k8s-pod-network";

/// Why a config text cannot be edited.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Not JSON at all.
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON that the span scanner could not follow.
    #[error(transparent)]
    Span(#[from] SpanError),
    /// JSON, but not a config the kubelet would load.
    #[error("not a usable CNI config: {0}")]
    Invalid(String),
    /// Istio's own `istio-cni` plugin is chained already: two CNI agents would fight over
    /// every pod.
    #[error(
        "Istio's istio-cni plugin is already chained in this config: remove istio-cni first \
         (helm uninstall of its chart, or istioctl with components.cni.enabled=false), then \
         install ambient-cni; see docs/migrating-from-istio-cni.md"
    )]
    IstioCniPresent,
}

/// The plugin type Istio's own CNI plugin registers.
pub const ISTIO_CNI_TYPE: &str = "istio-cni";

/// What kind of network config a file holds, by the kubelet's (libcni's) rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfKind {
    /// A `.conflist`: `name` and a non-empty `plugins` array of typed plugins.
    List,
    /// A `.conf` / `.json`: one plugin with a `type`.
    Single,
}

/// Whether our entry is in a conflist, and in the right shape and place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Exactly one entry of ours, last, equal to the wanted one.
    Current,
    /// Ours is present but differs, is not last, or is duplicated.
    Stale,
    /// No entry of ours.
    Absent,
}

/// Config file extensions the kubelet / container runtimes load.
pub const CONF_EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

/// Classify `text` (the content of `file_name`) as the kubelet would; `Err` says why it is skipped.
pub fn classify(file_name: &str, text: &str) -> Result<ConfKind, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("unparseable: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if file_name.ends_with(".conflist") {
        if !obj.get("name").is_some_and(Value::is_string) {
            return Err("conflist without a name".into());
        }
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or("conflist without a plugins array")?;
        if plugins.is_empty() {
            return Err("conflist with no plugins".into());
        }
        if plugins
            .iter()
            .any(|p| !p.get("type").is_some_and(Value::is_string))
        {
            return Err("conflist with a plugin without type".into());
        }
        Ok(ConfKind::List)
    } else if file_name.ends_with(".conf") || file_name.ends_with(".json") {
        if !obj.get("type").is_some_and(Value::is_string) {
            return Err(".conf without type".into());
        }
        Ok(ConfKind::Single)
    } else {
        Err("not a .conf, .conflist or .json file".into())
    }
}

/// The `type` of every plugin in a conflist (or of the single plugin of a `.conf`).
pub fn plugin_types(text: &str) -> Result<Vec<String>, MergeError> {
    let v: Value = serde_json::from_str(text)?;
    let ty = |p: &Value| p.get("type").and_then(Value::as_str).map(str::to_string);
    Ok(match v.get("plugins").and_then(Value::as_array) {
        Some(plugins) => plugins.iter().filter_map(ty).collect(),
        None => ty(&v).into_iter().collect(),
    })
}

/// Whether every plugin `text` names is ours: such a file is no primary network config.
pub fn only_ours(text: &str) -> bool {
    plugin_types(text)
        .is_ok_and(|ts| !ts.is_empty() && ts.iter().all(|t| t == crate::entry::PLUGIN_TYPE))
}

/// Where our entry stands in the conflist `text`.
pub fn entry_state(text: &str, entry: &PluginEntry) -> Result<EntryState, MergeError> {
    let v: Value = serde_json::from_str(text)?;
    let plugins = v
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| MergeError::Invalid("no plugins array".into()))?;
    let ours: Vec<usize> = (0..plugins.len())
        .filter(|&i| PluginEntry::is_ours(&plugins[i]))
        .collect();
    Ok(match ours.as_slice() {
        [] => EntryState::Absent,
        [i] if *i + 1 == plugins.len() && plugins[*i] == entry.to_value() => EntryState::Current,
        _ => EntryState::Stale,
    })
}

/// The conflist `text` with every entry of ours removed and `entry` appended last.
pub fn insert(text: &str, entry: &PluginEntry) -> Result<String, MergeError> {
    if plugin_types(text)?.iter().any(|t| t == ISTIO_CNI_TYPE) {
        return Err(MergeError::IstioCniPresent);
    }
    let text = remove(text)?;
    let (arr, elems) = plugins_array(&text)?;
    let Some(last) = elems.last() else {
        return Err(MergeError::Invalid(
            "no plugin to chain after (empty plugins array)".into(),
        ));
    };
    // Reuse the separator that precedes the last element, minus its comma.
    let before_last = if elems.len() >= 2 {
        elems[elems.len() - 2].end
    } else {
        arr.start + 1
    };
    let between = &text[before_last..last.start];
    let sep = match between.find(',') {
        Some(i) => &between[i + 1..],
        None => between,
    };
    let entry_text = match sep.rfind('\n') {
        Some(nl) => {
            let elem_indent = &sep[nl + 1..];
            let unit =
                inner_unit(&text[last.clone()], elem_indent).unwrap_or_else(|| indent_unit(&text));
            reindent(&pretty(entry, &unit), elem_indent)
        }
        None => compact(entry),
    };
    let mut out = String::with_capacity(text.len() + entry_text.len() + sep.len() + 1);
    out.push_str(&text[..last.end]);
    out.push(',');
    out.push_str(sep);
    out.push_str(&entry_text);
    out.push_str(&text[last.end..]);
    Ok(out)
}

/// The conflist `text` with every entry of ours removed (unchanged when there is none).
pub fn remove(text: &str) -> Result<String, MergeError> {
    let mut text = text.to_string();
    loop {
        let (arr, elems) = plugins_array(&text)?;
        let mut ours = None;
        for (i, e) in elems.iter().enumerate() {
            let v: Value = serde_json::from_str(&text[e.clone()])?;
            if PluginEntry::is_ours(&v) {
                ours = Some(i);
                break;
            }
        }
        let Some(i) = ours else { return Ok(text) };
        let cut = removal_range(&elems, i, arr.start + 1, arr.end - 1);
        text.replace_range(cut, "");
    }
}

/// A single-plugin `.conf` wrapped into a conflist with `entry` chained after it. The list keeps
/// the conf's `name` (container runtimes key cached results by network name) and its
/// `cniVersion` when it is 0.3.0 or newer.
pub fn convert(text: &str, entry: &PluginEntry) -> Result<String, MergeError> {
    let v: Value = serde_json::from_str(text)?;
    let b = text.as_bytes();
    let root = value_span(b, 0)?;
    let (members, _) = object_members(b, root.start)?;
    let version = v
        .get("cniVersion")
        .and_then(Value::as_str)
        .filter(|s| chainable_version(s))
        .unwrap_or(FALLBACK_CNI_VERSION);
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or(FALLBACK_NETWORK_NAME);
    // The plugin keeps everything but its cniVersion (libcni injects the list's).
    let mut plugin = text[root.clone()].to_string();
    if let Some(i) = members.iter().position(|m| m.key == "cniVersion") {
        let spans: Vec<Range<usize>> = members.iter().map(member_span).collect();
        let cut = removal_range(&spans, i, root.start + 1, root.end - 1);
        plugin.replace_range(cut.start - root.start..cut.end - root.start, "");
    }
    let q = |s: &str| Value::String(s.to_string()).to_string();
    // Wrap first, then chain with `insert`, so that the entry is laid out exactly as a later
    // repair (`insert` again) would lay it out: the result is a fixed point of `insert`.
    let body = if plugin.contains('\n') {
        let u = indent_unit(text);
        let inner = format!("{u}{u}");
        format!(
            "{{\n{u}\"cniVersion\": {},\n{u}\"name\": {},\n{u}\"plugins\": [\n{inner}{}\n{u}]\n}}",
            q(version),
            q(name),
            reindent(&plugin, &inner),
        )
    } else {
        format!(
            "{{\"cniVersion\":{},\"name\":{},\"plugins\":[{}]}}",
            q(version),
            q(name),
            plugin,
        )
    };
    let wrapped = format!("{}{}{}", &text[..root.start], body, &text[root.end..]);
    insert(&wrapped, entry)
}

/// The conflist text for `text` (of kind `kind`) with our entry chained last.
pub fn chain(kind: ConfKind, text: &str, entry: &PluginEntry) -> Result<String, MergeError> {
    match kind {
        ConfKind::List => insert(text, entry),
        ConfKind::Single => convert(text, entry),
    }
}

/// Span of the `plugins` array and of its elements.
fn plugins_array(text: &str) -> Result<(Range<usize>, Vec<Range<usize>>), MergeError> {
    let b = text.as_bytes();
    let root = value_span(b, 0)?;
    if b.get(root.start) != Some(&b'{') {
        return Err(MergeError::Invalid("not a JSON object".into()));
    }
    let (members, _) = object_members(b, root.start)?;
    // Duplicate keys: the last one wins, as with Go's encoding/json.
    let m = members
        .iter()
        .rev()
        .find(|m| m.key == "plugins")
        .ok_or_else(|| MergeError::Invalid("no plugins array".into()))?;
    if b.get(m.value.start) != Some(&b'[') {
        return Err(MergeError::Invalid("plugins is not an array".into()));
    }
    let (elems, end) = array_elements(b, m.value.start)?;
    Ok((m.value.start..end, elems))
}

fn member_span(m: &Member) -> Range<usize> {
    m.key_span.start..m.value.end
}

/// The bytes to cut to drop item `i` of a comma list, separator included, so that removing the
/// item we appended restores the original text exactly.
fn removal_range(items: &[Range<usize>], i: usize, open: usize, close: usize) -> Range<usize> {
    if items.len() == 1 {
        open..close
    } else if i > 0 {
        items[i - 1].end..items[i].end
    } else {
        items[0].start..items[1].start
    }
}

fn chainable_version(v: &str) -> bool {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (0, 3)
}

/// The file's indentation unit: the leading whitespace of its first indented line.
fn indent_unit(text: &str) -> String {
    for line in text.lines().skip(1) {
        let ws: String = line
            .chars()
            .take_while(|c| *c == ' ' || *c == '\t')
            .collect();
        if !ws.is_empty() && ws.len() < line.len() {
            if ws.starts_with('\t') {
                return "\t".into();
            }
            return ws;
        }
    }
    "  ".into()
}

/// The indentation a multi-line element uses inside itself, relative to its own line.
fn inner_unit(elem: &str, elem_indent: &str) -> Option<String> {
    let line = elem.lines().nth(1)?;
    let ws: String = line
        .chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .collect();
    let rest = ws.strip_prefix(elem_indent)?;
    (!rest.is_empty()).then(|| rest.to_string())
}

fn pretty(entry: &PluginEntry, unit: &str) -> String {
    let mut buf = Vec::new();
    let mut ser =
        Serializer::with_formatter(&mut buf, PrettyFormatter::with_indent(unit.as_bytes()));
    if serde::Serialize::serialize(entry, &mut ser).is_err() {
        return compact(entry);
    }
    String::from_utf8(buf).unwrap_or_else(|_| compact(entry))
}

fn compact(entry: &PluginEntry) -> String {
    serde_json::to_string(entry).unwrap_or_default()
}

/// Indent every line after the first by `indent`. Safe on JSON: strings hold no raw newlines.
fn reindent(s: &str, indent: &str) -> String {
    s.replace('\n', &format!("\n{indent}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> PluginEntry {
        PluginEntry::default()
    }

    #[test]
    fn insert_then_remove_is_identity_and_idempotent() {
        let texts = [
            "{\"cniVersion\":\"0.3.1\",\"name\":\"n\",\"plugins\":[{\"type\":\"a\"}]}",
            "{\n  \"name\": \"n\",\n  \"plugins\": [\n    {\n      \"type\": \"a\"\n    },\n    {\"type\": \"b\"}\n  ]\n}\n",
        ];
        for t in texts {
            let once = insert(t, &entry()).unwrap();
            assert_eq!(entry_state(&once, &entry()).unwrap(), EntryState::Current);
            assert_eq!(insert(&once, &entry()).unwrap(), once, "idempotent");
            assert_eq!(remove(&once).unwrap(), t, "remove restores the original");
            assert_eq!(plugin_types(&once).unwrap().last().unwrap(), "ambient-cni");
        }
    }

    #[test]
    fn old_entry_in_the_middle_is_replaced_by_one_last() {
        let t = r#"{"name":"n","plugins":[{"type":"ambient-cni","timeout_ms":1},{"type":"a"},{"type":"ambient-cni"}]}"#;
        assert_eq!(entry_state(t, &entry()).unwrap(), EntryState::Stale);
        let out = insert(t, &entry()).unwrap();
        assert_eq!(plugin_types(&out).unwrap(), vec!["a", "ambient-cni"]);
        assert_eq!(entry_state(&out, &entry()).unwrap(), EntryState::Current);
        assert_eq!(
            remove(t).unwrap(),
            r#"{"name":"n","plugins":[{"type":"a"}]}"#
        );
    }

    #[test]
    fn stale_settings_are_detected() {
        let mut e = entry();
        let t = insert(r#"{"name":"n","plugins":[{"type":"a"}]}"#, &e).unwrap();
        e.timeout_ms = 7;
        assert_eq!(entry_state(&t, &e).unwrap(), EntryState::Stale);
        let t2 = insert(&t, &e).unwrap();
        let v: Value = serde_json::from_str(&t2).unwrap();
        assert_eq!(v["plugins"][1]["timeout_ms"], 7);
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn convert_keeps_name_and_version_and_drops_inner_version() {
        let t = "{\n    \"cniVersion\": \"1.0.0\",\n    \"name\": \"mynet\",\n    \"type\": \"bridge\"\n}\n";
        let out = convert(t, &entry()).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "mynet");
        assert!(v["plugins"][0].get("cniVersion").is_none());
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1], entry().to_value());
        assert!(out.ends_with("}\n"));
        assert_eq!(classify("x.conflist", &out), Ok(ConfKind::List));
        // Too old to chain, and compact: wrapped with the fallback version, compactly.
        let out = convert(r#"{"cniVersion":"0.2.0","type":"bridge"}"#, &entry()).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], FALLBACK_CNI_VERSION);
        assert_eq!(v["name"], FALLBACK_NETWORK_NAME);
        assert!(!out.contains('\n'));
    }

    /// Fuzz finding (fuzz/regressions/conflist_merge/mixed-indent.conf): a `.conf` whose
    /// first indented line uses spaces and whose body uses tabs. Converting then repairing
    /// must not rewrite the file: `insert` is a fixed point of `convert`'s output.
    #[test]
    fn convert_output_is_a_fixed_point_of_insert() {
        let text = include_str!("../../fuzz/regressions/conflist_merge/mixed-indent.conf");
        let out = convert(text, &entry()).unwrap();
        assert_eq!(entry_state(&out, &entry()).unwrap(), EntryState::Current);
        assert_eq!(insert(&out, &entry()).unwrap(), out);
        let pretty =
            "{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"n\",\n  \"type\": \"bridge\"\n}\n";
        let out = convert(pretty, &entry()).unwrap();
        assert_eq!(insert(&out, &entry()).unwrap(), out);
    }

    /// Fuzz finding (fuzz/regressions/conflist_merge/single-conf-of-our-type.conf): a `.conf`
    /// that is our own plugin has nothing to chain after; converting it is an error, not a
    /// list holding two entries of ours.
    #[test]
    fn a_conf_of_our_own_type_cannot_be_chained() {
        let text =
            include_str!("../../fuzz/regressions/conflist_merge/single-conf-of-our-type.conf");
        assert_eq!(classify("10-x.conf", text), Ok(ConfKind::Single));
        assert!(only_ours(text));
        assert!(matches!(
            convert(text, &entry()),
            Err(MergeError::Invalid(_))
        ));
    }

    #[test]
    fn classify_follows_libcni() {
        assert_eq!(classify("a.conf", r#"{"type":"x"}"#), Ok(ConfKind::Single));
        assert_eq!(classify("a.json", r#"{"type":"x"}"#), Ok(ConfKind::Single));
        assert!(classify("a.conf", r#"{"name":"x"}"#).is_err());
        assert!(classify("a.conflist", r#"{"name":"x","plugins":[]}"#).is_err());
        assert!(classify("a.conflist", r#"{"name":"x"}"#).is_err());
        assert!(classify("a.conflist", r#"{"plugins":[{"type":"a"}]}"#).is_err());
        assert!(classify("a.conflist", "{").is_err());
        assert!(classify("a.txt", r#"{"type":"x"}"#).is_err());
    }

    #[test]
    fn empty_plugins_cannot_be_chained() {
        assert!(insert(r#"{"name":"n","plugins":[]}"#, &entry()).is_err());
        assert!(insert(r#"{"name":"n"}"#, &entry()).is_err());
        assert!(insert("[1]", &entry()).is_err());
    }
}
