// Package apierr is the error vocabulary shared by the agent's packages and
// its HTTP layer: every failure a client can see carries the status and code
// of PROTOCOL.md, so lower layers decide what kind of failure it is and the
// server only renders it.
package apierr

import (
	"encoding/json"
	"errors"
	"net/http"
)

// Codes of PROTOCOL.md.
const (
	CodeBadRequest      = "BadRequest"
	CodeUnauthorized    = "Unauthorized"
	CodeNotFound        = "NotFound"
	CodeConflict        = "Conflict"
	CodeCommandNotFound = "CommandNotFound"
	CodeInternal        = "Internal"
)

// Error is a failure with its HTTP status and protocol code.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

func New(status int, code, msg string) *Error {
	return &Error{Status: status, Code: code, Message: msg}
}

func BadRequest(msg string) *Error { return New(http.StatusBadRequest, CodeBadRequest, msg) }
func NotFound(msg string) *Error   { return New(http.StatusNotFound, CodeNotFound, msg) }
func Conflict(msg string) *Error   { return New(http.StatusConflict, CodeConflict, msg) }
func Internal(msg string) *Error   { return New(http.StatusInternalServerError, CodeInternal, msg) }
func CommandNotFound(msg string) *Error {
	return New(http.StatusBadRequest, CodeCommandNotFound, msg)
}

// From classifies any error: an *Error anywhere in the chain keeps its
// status, anything else is Internal.
func From(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return Internal(err.Error())
}

type body struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// Write renders err as the protocol's JSON error object.
func Write(w http.ResponseWriter, err error) {
	e := From(err)
	var b body
	b.Error.Code = e.Code
	b.Error.Message = e.Message
	w.Header().Set("Content-Type", "application/json")
	w.Header().Del("Content-Length")
	w.WriteHeader(e.Status)
	_ = json.NewEncoder(w).Encode(b)
}
