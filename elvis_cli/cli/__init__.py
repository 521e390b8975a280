"""The command line: parses arguments, calls one library function per command, prints."""
