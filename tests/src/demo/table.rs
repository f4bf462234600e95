//! The demo's output tables: aligned columns, two-space indent.

use std::io::Write;

/// A table printed with aligned columns.
pub struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headings.
    pub fn new(head: &[&'static str]) -> Self {
        Self {
            head: head.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (cells beyond the headings are printed unaligned).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.head.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>| {
            let mut s = String::from("  ");
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    s.push_str(c);
                } else {
                    let w = widths.get(i).copied().unwrap_or(0);
                    s.push_str(&format!("{c:<w$}  "));
                }
            }
            format!("{}\n", s.trim_end())
        };
        let mut out = line(self.head.clone());
        for r in &self.rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        out
    }

    /// Prints it to stdout now (the demo's progress is read live).
    pub fn print(&self) {
        print!("{}", self.render());
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_and_leaves_the_last_unpadded() {
        let mut t = Table::new(&["POD", "STATE"]);
        t.row(vec!["demo/web-10".into(), "yes".into()]);
        t.row(vec!["a".into(), String::new()]);
        assert_eq!(
            t.render(),
            "  POD          STATE\n  demo/web-10  yes\n  a\n"
        );
    }
}
