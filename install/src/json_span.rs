//! A minimal JSON scanner that reports byte spans, so edits can splice text and leave every
//! other byte of a CNI config exactly as its owner wrote it (key order, number spelling,
//! indentation, comments-free trailing newline). Input is validated by serde_json first; the
//! scanner still reports errors instead of panicking.

use std::ops::Range;

/// A scan failure at a byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed JSON at byte {0}")]
pub struct SpanError(pub usize);

/// One `"key": value` member of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Decoded key.
    pub key: String,
    /// Span of the key's string literal (quotes included).
    pub key_span: Range<usize>,
    /// Span of the value.
    pub value: Range<usize>,
}

/// Index of the first non-whitespace byte at or after `i`.
pub fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Span of the JSON value starting at or after `i` (leading whitespace skipped).
pub fn value_span(b: &[u8], i: usize) -> Result<Range<usize>, SpanError> {
    let start = skip_ws(b, i);
    let end = value_end(b, start)?;
    Ok(start..end)
}

fn value_end(b: &[u8], i: usize) -> Result<usize, SpanError> {
    match b.get(i) {
        Some(b'"') => string_end(b, i),
        Some(b'{') => Ok(object_members(b, i)?.1),
        Some(b'[') => Ok(array_elements(b, i)?.1),
        Some(c) if c.is_ascii_digit() || *c == b'-' => {
            let mut j = i + 1;
            while j < b.len() && matches!(b[j], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                j += 1;
            }
            Ok(j)
        }
        Some(b't') | Some(b'n') if b.len() >= i + 4 => Ok(i + 4),
        Some(b'f') if b.len() >= i + 5 => Ok(i + 5),
        _ => Err(SpanError(i)),
    }
}

fn string_end(b: &[u8], i: usize) -> Result<usize, SpanError> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err(SpanError(i))
}

/// Members of the object starting at `i` (which must be `{`) and the index just past its `}`.
pub fn object_members(b: &[u8], i: usize) -> Result<(Vec<Member>, usize), SpanError> {
    if b.get(i) != Some(&b'{') {
        return Err(SpanError(i));
    }
    let mut members = Vec::new();
    let mut j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b'}') {
        return Ok((members, j + 1));
    }
    loop {
        if b.get(j) != Some(&b'"') {
            return Err(SpanError(j));
        }
        let key_end = string_end(b, j)?;
        let key_text = std::str::from_utf8(&b[j..key_end]).map_err(|_| SpanError(j))?;
        let key: String = serde_json::from_str(key_text).map_err(|_| SpanError(j))?;
        let colon = skip_ws(b, key_end);
        if b.get(colon) != Some(&b':') {
            return Err(SpanError(colon));
        }
        let value = value_span(b, colon + 1)?;
        members.push(Member {
            key,
            key_span: j..key_end,
            value: value.clone(),
        });
        let k = skip_ws(b, value.end);
        match b.get(k) {
            Some(b',') => j = skip_ws(b, k + 1),
            Some(b'}') => return Ok((members, k + 1)),
            _ => return Err(SpanError(k)),
        }
    }
}

/// Element spans of the array starting at `i` (which must be `[`) and the index just past its `]`.
pub fn array_elements(b: &[u8], i: usize) -> Result<(Vec<Range<usize>>, usize), SpanError> {
    if b.get(i) != Some(&b'[') {
        return Err(SpanError(i));
    }
    let mut elems = Vec::new();
    let j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b']') {
        return Ok((elems, j + 1));
    }
    let mut j = j;
    loop {
        let v = value_span(b, j)?;
        elems.push(v.clone());
        let k = skip_ws(b, v.end);
        match b.get(k) {
            Some(b',') => j = k + 1,
            Some(b']') => return Ok((elems, k + 1)),
            _ => return Err(SpanError(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_of_members_and_elements() {
        let t = r#" { "a" : [1, {"x":"y\"}"} ,true], "b\u0041": -1.5e3 } "#;
        let b = t.as_bytes();
        let root = value_span(b, 0).unwrap();
        assert_eq!(&t[root.clone()], t.trim());
        let (m, end) = object_members(b, root.start).unwrap();
        assert_eq!(end, root.end);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].key, "a");
        assert_eq!(m[1].key, "bA");
        assert_eq!(&t[m[1].value.clone()], "-1.5e3");
        let (e, _) = array_elements(b, m[0].value.start).unwrap();
        let texts: Vec<&str> = e.iter().map(|r| &t[r.clone()]).collect();
        assert_eq!(texts, vec!["1", r#"{"x":"y\"}"}"#, "true"]);
    }

    #[test]
    fn errors_instead_of_panics() {
        for bad in ["{", "[1,", r#"{"a" 1}"#, r#""abc"#, "{\"a\":}", "x"] {
            assert!(value_span(bad.as_bytes(), 0).is_err(), "{bad}");
        }
    }
}
