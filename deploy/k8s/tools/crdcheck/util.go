package main

import (
	"bufio"
	"bytes"
)

// operatorVersion is the pinned module version in go.mod, for the report.
const operatorVersion = "v0.95.2"

func bufioReader(data []byte) *bufio.Reader {
	return bufio.NewReader(bytes.NewReader(data))
}
