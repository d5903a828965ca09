mod format;
mod scan;
