//! Output helpers: human sizes, aligned tables, quoted paths.

/// `1023 B`, `1.00 KiB`, `40.82 MiB`, ... (binary units, two decimals).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// Renders rows as left-aligned columns separated by two spaces, without
/// trailing spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A commit id as dm prints it: its first 12 hex digits.
pub fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// A path as git's `status --short` prints it: as is, or in double quotes
/// with C escapes when it holds a space (`R  a -> b` lines split on
/// spaces), a control character, a double quote, a backslash (a name with
/// a newline took two lines), an invisible formatting character (a
/// right-to-left override showed the name reversed) or bytes that are not
/// UTF-8 (each as `\ooo`).
pub fn quote_path(p: &[u8]) -> String {
    let invisible = |c: char| matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}');
    let plain = |c: char| !(c.is_control() || invisible(c) || c == '"' || c == '\\' || c == ' ');
    if let Ok(s) = std::str::from_utf8(p) {
        if s.chars().all(plain) {
            return s.to_string();
        }
    }
    let octal = |out: &mut String, bytes: &[u8]| {
        for b in bytes {
            out.push_str(&format!("\\{b:03o}"));
        }
    };
    let mut out = String::from("\"");
    for chunk in p.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() || invisible(c) => {
                    octal(&mut out, c.encode_utf8(&mut [0u8; 4]).as_bytes())
                }
                c => out.push(c),
            }
        }
        octal(&mut out, chunk.invalid());
    }
    out.push('"');
    out
}

/// A field of `-H` (tab-separated) output: as is, unless it holds a
/// control character (a tab or newline would split the line: a mount path,
/// an error message) or starts with a double quote; then quoted as
/// [`quote_path`] quotes.
pub fn tsv_field(s: &str) -> String {
    if s.starts_with('"') || s.chars().any(char::is_control) {
        quote_path(s.as_bytes())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_newlines_quotes_or_controls_are_quoted_as_git_does() {
        let q = |p: &str| quote_path(p.as_bytes());
        assert_eq!(q("/__default__/ab/é"), "/__default__/ab/é");
        assert_eq!(q("/__default__/a b/é"), "\"/__default__/a b/é\"");
        assert_eq!(q("/x/q -> r"), "\"/x/q -> r\"");
        assert_eq!(q("/x/\u{202e}txt.exe"), "\"/x/\\342\\200\\256txt.exe\"");
        assert_eq!(q("/x/new\nline"), "\"/x/new\\nline\"");
        assert_eq!(q("/x/\"q\"\\"), "\"/x/\\\"q\\\"\\\\\"");
        assert_eq!(q("/x/\u{1}"), "\"/x/\\001\"");
        // Not UTF-8: each such byte in octal, as git does.
        assert_eq!(
            quote_path(b"/x/bad\xff\xfe-\xc3\xa9"),
            "\"/x/bad\\377\\376-é\""
        );
    }

    #[test]
    fn tab_separated_fields_are_quoted_only_when_they_would_split_a_line() {
        assert_eq!(tsv_field("/mnt/my data"), "/mnt/my data");
        assert_eq!(tsv_field("/mnt/a\tb"), "\"/mnt/a\\tb\"");
        assert_eq!(
            tsv_field("failed:\nno such file"),
            "\"failed:\\nno such file\""
        );
        assert_eq!(tsv_field("\"x"), "\"\\\"x\"");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.00 KiB");
        assert_eq!(human_size(42_802_626), "40.82 MiB");
        assert_eq!(human_size(3 * 1024 * 1024 * 1024), "3.00 GiB");
    }

    #[test]
    fn tables() {
        let t = table(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["aaa".into(), "b".into(), "".into()],
        ]);
        assert_eq!(t, "A    BB  C\naaa  b\n");
    }
}
