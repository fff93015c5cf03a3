//! A few roff (man(7) macro) building blocks for the hand-written sections of the man pages.
//!
//! Text takes two inline marks: `` `literal` `` is set in bold (what the reader types: commands,
//! flags, file names), `{name}` in italics (what the reader replaces). Everything else is
//! escaped, so a page is plain ASCII roff whatever the text says.
//!
//! The pages are set without hyphenation and ragged right (`.nh`, `.ad l`, see
//! [`PAGE_SETUP`]): most of their words are options, paths and identifiers, which a hyphen
//! would break.

/// Requests after `.TH`: no hyphenation, left-adjusted lines.
pub const PAGE_SETUP: &str = ".nh\n.ad l\n";

use std::fmt::Write as _;

/// A man page section being written.
#[derive(Default)]
pub struct Roff {
    out: String,
}

/// Escapes one run of text: backslashes, hyphens (as `\-`, so options survive copy and paste),
/// quotes and the characters groff would otherwise typeset as typographic glyphs.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str(r"\e"),
            '-' => out.push_str(r"\-"),
            '\'' => out.push_str(r"\*(Aq"),
            '`' => out.push_str(r"\(ga"),
            '^' => out.push_str(r"\(ha"),
            '~' => out.push_str(r"\(ti"),
            _ => out.push(c),
        }
    }
    out
}

/// A line of input text: a leading `.` or `'` would be read as a request.
fn line(text: String) -> String {
    if text.starts_with('.') || text.starts_with('\'') {
        format!(r"\&{text}")
    } else {
        text
    }
}

/// Escapes `text` and turns its `` `literal` `` and `{name}` marks into font changes.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(['`', '{']) {
        let (close, font) = if rest[start..].starts_with('`') {
            ('`', "B")
        } else {
            ('}', "I")
        };
        let Some(len) = rest[start + 1..].find(close) else {
            break;
        };
        out.push_str(&escape(&rest[..start]));
        let marked = &rest[start + 1..start + 1 + len];
        let _ = write!(out, r"\f{font}{}\fR", escape(marked));
        rest = &rest[start + 2 + len..];
    }
    out.push_str(&escape(rest));
    line(out)
}

impl Roff {
    /// A section heading (`.SH`).
    pub fn section(&mut self, title: &str) -> &mut Self {
        let _ = writeln!(self.out, ".SH \"{}\"", escape(title));
        self
    }

    /// A paragraph.
    pub fn para(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.out, ".PP\n{}", inline(text));
        self
    }

    /// A tagged paragraph (`.TP`): `tag` on its own line, `text` indented below it.
    pub fn item(&mut self, tag: &str, text: &str) -> &mut Self {
        let _ = writeln!(self.out, ".TP\n{}\n{}", inline(tag), inline(text));
        self
    }

    /// A tagged paragraph with several tags, one per line (`.TP`, then `.TQ`).
    pub fn items(&mut self, tags: &[&str], text: &str) -> &mut Self {
        for (i, tag) in tags.iter().enumerate() {
            let macro_name = if i == 0 { "TP" } else { "TQ" };
            let _ = writeln!(self.out, ".{macro_name}\n{}", inline(tag));
        }
        let _ = writeln!(self.out, "{}", inline(text));
        self
    }

    /// An example: lines set as they are (no filling, no marks), indented.
    pub fn example(&mut self, lines: &[&str]) -> &mut Self {
        self.out.push_str(".PP\n.RS 4\n.EX\n");
        for text in lines {
            let _ = writeln!(self.out, "{}", line(escape(text)));
        }
        self.out.push_str(".EE\n.RE\n");
        self
    }

    /// References to other pages, `name(section)`, comma separated (SEE ALSO).
    pub fn references(&mut self, pages: &[(&str, &str)]) -> &mut Self {
        self.out.push_str(".PP\n");
        for (i, (name, section)) in pages.iter().enumerate() {
            let comma = if i + 1 < pages.len() { "," } else { "" };
            // \% keeps groff from hyphenating the name.
            let _ = writeln!(self.out, ".BR \\%{} ({}){comma}", escape(name), section);
        }
        self
    }

    /// The roff text written so far.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_become_fonts_and_the_rest_is_escaped() {
        assert_eq!(
            inline("run `--file` on {image}'s path"),
            r"run \fB\-\-file\fR on \fIimage\fR\*(Aqs path"
        );
        assert_eq!(inline(".starts with a dot"), r"\&.starts with a dot");
        assert_eq!(inline("a `lone mark"), r"a \(galone mark");
        assert_eq!(escape(r"a \ b"), r"a \e b");
    }
}
