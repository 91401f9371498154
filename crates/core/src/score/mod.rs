//! Scoring (to be written: see issue 4).
