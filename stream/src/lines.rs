//! Lines of a file or a generator as records of one source: every line is a
//! record whose position is its line number (1-based, blank lines counted), so
//! the position of an event does not depend on how the input is cut into
//! batches. A batch is only the unit of a commit; a rerun cut differently
//! skips exactly the lines already applied (the layers' marks are per source
//! and position).

use std::io::BufRead;

use tally_common::source::{Position, Record};
use tally_common::{Context as _, Result};

/// A batch of whole lines, numbered on from the batches before it.
#[derive(Debug, Default)]
pub struct LineBatch {
    buf: Vec<u8>,
    /// (line number, start, end) of each line in `buf`, newline included.
    lines: Vec<(u64, usize, usize)>,
    /// The number of the last line taken (of this batch or an earlier one).
    last_line: u64,
    /// A last line without its newline that is not valid JSON yet was left in
    /// the input.
    held_back: bool,
}

impl LineBatch {
    /// An empty batch whose buffer starts with room for `bytes`; its first line
    /// is line 1.
    pub fn with_capacity(bytes: usize) -> Self {
        LineBatch {
            buf: Vec::with_capacity(bytes),
            ..LineBatch::default()
        }
    }

    /// Forget the lines held, to take the next batch (numbering goes on).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.lines.clear();
    }

    /// Take `line` as the next line (a newline is added when it has none).
    pub fn push(&mut self, line: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            self.buf.push(b'\n');
        }
        self.last_line += 1;
        self.lines.push((self.last_line, start, self.buf.len()));
    }

    /// Clear the batch and read the next lines of `reader`, up to `max` of them
    /// (at least one); the batch is empty at the end of the input. A last line
    /// without its newline that is not valid JSON yet (a writer may still be
    /// appending it) is not taken: see [`LineBatch::held_back`].
    pub fn read_from(&mut self, reader: &mut dyn BufRead, max: usize) -> Result<()> {
        self.clear();
        while self.lines.len() < max.max(1) {
            let start = self.buf.len();
            let read = reader
                .read_until(b'\n', &mut self.buf)
                .context("reading input")?;
            if read == 0 {
                break;
            }
            if !self.buf.ends_with(b"\n") && is_incomplete(&self.buf[start..]) {
                // a writer may still be appending this line: it is taken up, whole, next time
                self.buf.truncate(start);
                self.held_back = true;
                break;
            }
            self.last_line += 1;
            self.lines.push((self.last_line, start, self.buf.len()));
        }
        Ok(())
    }

    /// The lines held as records, positions their line numbers.
    pub fn records(&self) -> Vec<Record<'_>> {
        self.lines
            .iter()
            .map(|&(n, a, b)| Record::new(Position::from_u64(n), &self.buf[a..b]))
            .collect()
    }

    /// Lines held.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Bytes of the lines held (for progress).
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The number of the last line taken so far (0 before the first).
    pub fn last_line(&self) -> u64 {
        self.last_line
    }

    /// Whether [`LineBatch::read_from`] left an incomplete last line in the
    /// input (line [`LineBatch::last_line`] + 1).
    pub fn held_back(&self) -> bool {
        self.held_back
    }
}

/// Whether a last line without a newline looks cut short: not blank and not a
/// JSON value (a line cut part way is never valid JSON).
fn is_incomplete(line: &[u8]) -> bool {
    let line = tally_common::decode::strip_bom(line);
    !line.iter().all(u8::is_ascii_whitespace)
        && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(b: &LineBatch) -> Vec<(String, String)> {
        b.records()
            .iter()
            .map(|r| {
                (
                    r.position.to_string(),
                    String::from_utf8(r.data.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn positions_are_line_numbers_whatever_the_batch_size() {
        let input = b"{\"a\":1}\n\n{\"a\":2}\n{\"a\":3}\n";
        let mut reader = &input[..];
        let mut b = LineBatch::default();
        b.read_from(&mut reader, 2).unwrap();
        assert_eq!(
            records(&b),
            [
                ("1".into(), "{\"a\":1}\n".into()),
                ("2".into(), "\n".into())
            ]
        );
        b.read_from(&mut reader, 2).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.records()[1].position, Position::from_u64(4));
        b.read_from(&mut reader, 2).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.last_line(), 4);
        assert!(!b.held_back());
    }

    #[test]
    fn an_incomplete_last_line_is_held_back_and_a_complete_one_taken() {
        let mut b = LineBatch::default();
        b.read_from(&mut &b"{\"a\":1}\n{\"a\":"[..], 10).unwrap();
        assert_eq!(b.len(), 1);
        assert!(b.held_back());
        assert_eq!(b.last_line(), 1);

        let mut b = LineBatch::default();
        b.read_from(&mut &b"{\"a\":1}\n{\"a\":2}"[..], 10).unwrap();
        assert_eq!(b.len(), 2);
        assert!(!b.held_back());
    }

    #[test]
    fn pushed_lines_get_a_newline_and_the_next_number() {
        let mut b = LineBatch::with_capacity(64);
        b.push(b"x");
        b.clear();
        b.push(b"y\n");
        b.push(b"z");
        assert_eq!(
            records(&b),
            [("2".into(), "y\n".into()), ("3".into(), "z\n".into())]
        );
        assert_eq!(b.bytes(), 4);
    }
}
