//! One-line messages to stderr, formatted on the stack and written with a
//! single write(2) so lines from several processes do not interleave.

use std::fmt::{self, Write};

use crate::sys;

/// A fixed-size line buffer; what does not fit is cut (never an error, never
/// a panic).
pub struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line {
            buf: [0; 1024],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep one byte for the newline.
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes `graft: ` + the message + newline to stderr.
pub fn emit(args: fmt::Arguments<'_>) {
    let mut l = Line::new();
    let _ = l.write_str("graft: ");
    let _ = l.write_fmt(args);
    l.buf[l.len] = b'\n';
    l.len += 1;
    sys::sys_write_stderr(l.as_bytes());
}

macro_rules! say {
    ($($t:tt)*) => { $crate::log::emit(format_args!($($t)*)) };
}
pub(crate) use say;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_not_panicking() {
        let mut l = Line::new();
        for _ in 0..100 {
            l.write_str("0123456789abcdef").unwrap();
        }
        assert_eq!(l.as_bytes().len(), 1023);
    }
}
