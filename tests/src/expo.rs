//! A strict reader of the Prometheus / OpenMetrics text exposition format: the
//! demo prints the agent's metrics with it and the agent's tests check `/metrics`
//! with it (a development tool: the shipped agent only writes the format).
//!
//! Strict on purpose: unknown comment kinds, samples outside their family,
//! duplicate series, bad names, bad escapes, text after `# EOF` and
//! non-cumulative histograms are errors, so a malformed scrape fails a test.

use std::collections::{BTreeMap, HashSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample name (`foo_total`, `foo_bucket`, ...).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One metric family (`# TYPE` block).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The family name.
    pub name: String,
    /// `counter`, `gauge`, `histogram`, ... (`untyped` when no `# TYPE` came first).
    pub kind: String,
    /// `# HELP` text.
    pub help: Option<String>,
    /// `# UNIT`.
    pub unit: Option<String>,
    /// The samples, in order.
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Exposition {
    /// Families in order.
    pub families: Vec<Family>,
    /// Whether it ended with `# EOF` (OpenMetrics).
    pub eof: bool,
}

/// Where and why the text is not a valid exposition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("exposition line {line}: {what}")]
pub struct ParseError {
    /// 1-based line number (0: the whole text).
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

const KINDS: [&str; 9] = [
    "counter",
    "gauge",
    "histogram",
    "summary",
    "untyped",
    "unknown",
    "info",
    "stateset",
    "gaugehistogram",
];

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// The sample-name suffixes a family of `kind` may use.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" | "gaugehistogram" => {
            &["_bucket", "_sum", "_count", "_created", "_gsum", "_gcount"]
        }
        "summary" => &["", "_sum", "_count", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected '{'")?;
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = rest[..eq].trim();
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: value not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("label {name}: bad escape {other:?}")),
                },
                Some((_, ch)) => value.push(ch),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end + 1..];
        rest = rest.trim_start_matches(' ');
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("sample without a value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end..])?
    } else {
        (BTreeMap::new(), &line[name_end..])
    };
    let mut fields = rest.split(' ').filter(|f| !f.is_empty());
    let raw = fields.next().ok_or("sample without a value")?;
    let value = parse_value(raw).ok_or_else(|| format!("bad value {raw:?}"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!(
            "unexpected {extra:?} after the value (exemplars are not expected)"
        ));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses and validates an exposition.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    let mut declared = HashSet::new();
    let mut series = HashSet::new();
    let mut typed = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let err = |what: String| ParseError { line: i + 1, what };
        if out.eof {
            return Err(err("text after # EOF".into()));
        }
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            if comment == "EOF" {
                out.eof = true;
                continue;
            }
            let mut parts = comment.splitn(3, ' ');
            let (kw, name, arg) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
            let Some(name) = name.filter(|n| valid_metric_name(n)) else {
                return Err(err(format!(
                    "comment without a valid metric name: {line:?}"
                )));
            };
            let fresh = out.families.last().is_none_or(|f| f.name != name);
            if fresh {
                if !declared.insert(name.to_owned()) {
                    return Err(err(format!("family {name} declared twice")));
                }
                out.families.push(Family {
                    name: name.to_owned(),
                    kind: "untyped".into(),
                    help: None,
                    unit: None,
                    samples: Vec::new(),
                });
            }
            let fam = out
                .families
                .last_mut()
                .ok_or_else(|| err("no family".into()))?;
            match kw {
                Some("HELP") if fam.help.is_none() => fam.help = Some(arg.to_owned()),
                Some("TYPE")
                    if KINDS.contains(&arg)
                        && fam.samples.is_empty()
                        && typed.insert(name.to_owned()) =>
                {
                    fam.kind = arg.to_owned()
                }
                Some("UNIT") if fam.unit.is_none() && name.ends_with(&format!("_{arg}")) => {
                    fam.unit = Some(arg.to_owned())
                }
                _ => return Err(err(format!("unexpected comment {line:?}"))),
            }
            continue;
        }
        let sample = parse_sample(line).map_err(err)?;
        let belongs = |f: &Family| {
            suffixes(&f.kind)
                .iter()
                .any(|s| sample.name.strip_suffix(s) == Some(f.name.as_str()))
        };
        if !out.families.last().is_some_and(belongs) {
            // A sample with no family before it: its own untyped family.
            if out.families.iter().any(belongs) || !declared.insert(sample.name.clone()) {
                return Err(err(format!("sample {} outside its family", sample.name)));
            }
            out.families.push(Family {
                name: sample.name.clone(),
                kind: "untyped".into(),
                help: None,
                unit: None,
                samples: Vec::new(),
            });
        }
        if !series.insert((sample.name.clone(), sample.labels.clone())) {
            return Err(err(format!(
                "duplicate series {} {:?}",
                sample.name, sample.labels
            )));
        }
        if let Some(f) = out.families.last_mut() {
            f.samples.push(sample);
        }
    }
    for f in &out.families {
        if f.kind == "histogram" {
            check_histogram(f).map_err(|what| ParseError { line: 0, what })?;
        }
    }
    Ok(out)
}

/// Buckets carry `le`, are cumulative, and `+Inf` equals `_count`, per label set.
fn check_histogram(f: &Family) -> Result<(), String> {
    let mut groups: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<BTreeMap<String, String>, f64> = BTreeMap::new();
    for s in &f.samples {
        let mut labels = s.labels.clone();
        if s.name.ends_with("_bucket") {
            let le = labels
                .remove("le")
                .ok_or_else(|| format!("{}: bucket without le", f.name))?;
            let le = parse_value(&le).ok_or_else(|| format!("{}: bad le {le:?}", f.name))?;
            groups.entry(labels).or_default().push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(labels, s.value);
        }
    }
    for (labels, buckets) in &groups {
        let ordered = buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        if !ordered {
            return Err(format!("{} {labels:?}: buckets not cumulative", f.name));
        }
        match buckets.last() {
            Some((le, n)) if le.is_infinite() && Some(n) == counts.get(labels) => {}
            _ => {
                return Err(format!(
                    "{} {labels:?}: +Inf bucket missing or != _count",
                    f.name
                ))
            }
        }
    }
    Ok(())
}

impl Exposition {
    /// The family `name`.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The value of sample `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP reqs Requests.\n# TYPE reqs counter\nreqs_total{code=\"200\",path=\"a\\\"b\\\\c\\n\"} 3\n\
        # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n# UNIT lat_seconds seconds\n\
        lat_seconds_sum 0.5\nlat_seconds_count 2\nlat_seconds_bucket{le=\"0.1\"} 1\nlat_seconds_bucket{le=\"+Inf\"} 2\n\
        # TYPE up gauge\nup 1\n# EOF\n";

    #[test]
    fn parses_a_valid_exposition() {
        let e = parse(GOOD).unwrap();
        assert!(e.eof);
        let names: Vec<_> = e
            .families
            .iter()
            .map(|f| (f.name.as_str(), f.kind.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("reqs", "counter"),
                ("lat_seconds", "histogram"),
                ("up", "gauge")
            ]
        );
        assert_eq!(e.value("reqs_total", &[("path", "a\"b\\c\n")]), Some(3.0));
        assert_eq!(e.value("lat_seconds_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(
            e.family("lat_seconds").and_then(|f| f.unit.as_deref()),
            Some("seconds")
        );
    }

    #[test]
    fn rejects_malformed_text() {
        let bad = [
            (
                "# TYPE x counter\nx_total 1\n# EOF\nx_total 2\n",
                "after # EOF",
            ),
            (
                "# TYPE x counter\nx_total{a=\"1\",a=\"2\"} 1\n",
                "duplicate label",
            ),
            ("# TYPE x counter\nx_total{a=1} 1\n", "not quoted"),
            ("# TYPE x counter\nx_total{a=\"\\q\"} 1\n", "bad escape"),
            ("# TYPE x counter\nx_total one\n", "bad value"),
            (
                "# TYPE x counter\nx_total 1\nx_total 1\n",
                "duplicate series",
            ),
            ("# TYPE x gauge\n# TYPE x gauge\n", "unexpected comment"),
            ("# TYPE x bogus\n", "unexpected comment"),
            (
                "# TYPE x counter\nx_total 1\n# TYPE y gauge\nx_total 2\n",
                "outside its family",
            ),
            ("# TYPE 9x gauge\n", "valid metric name"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",
                "not cumulative",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 2\n",
                "+Inf bucket",
            ),
            ("# TYPE x gauge\nx 1 2 3\n", "exemplars"),
        ];
        for (text, want) in bad {
            let e = parse(text).expect_err(text);
            assert!(e.what.contains(want), "{text:?}: {e}");
        }
    }
}
