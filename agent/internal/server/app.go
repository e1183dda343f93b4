package server

import (
	"net/http"
	"strconv"

	"cocoon/agent/internal/apierr"
	"cocoon/agent/internal/process"
)

type appRequest struct {
	Argv    []string          `json:"argv"`
	Env     map[string]string `json:"env"`
	Cwd     string            `json:"cwd"`
	User    string            `json:"user"`
	Restart string            `json:"restart"`
	// StopSignal is what stops the app (DELETE /app, a replacement): "SIGTERM" by default.
	StopSignal string `json:"stopSignal"`
}

func (s *Server) getApp(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.app.Status())
}

func (s *Server) postApp(w http.ResponseWriter, r *http.Request) {
	var req appRequest
	if err := decodeJSON(w, r, &req, false); err != nil {
		apierr.Write(w, err)
		return
	}
	if len(req.Argv) == 0 {
		apierr.Write(w, apierr.BadRequest("argv is required"))
		return
	}
	stop, err := process.ParseSignal(req.StopSignal)
	if err != nil {
		apierr.Write(w, apierr.BadRequest("stopSignal: "+err.Error()))
		return
	}
	st, err := s.app.Start(process.AppSpec{
		Spec:       process.Spec{Argv: req.Argv, Env: req.Env, Cwd: req.Cwd, User: req.User},
		Restart:    req.Restart,
		StopSignal: stop,
	})
	if err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) deleteApp(w http.ResponseWriter, r *http.Request) {
	s.app.Stop()
	writeJSON(w, http.StatusOK, okBody)
}

func (s *Server) logs(w http.ResponseWriter, r *http.Request) {
	follow, _ := strconv.ParseBool(r.URL.Query().Get("follow"))
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	data, off, wake := s.app.Logs.ReadFrom(0)
	for {
		if len(data) > 0 {
			if _, err := w.Write(data); err != nil {
				return
			}
		}
		if !follow {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
		select {
		case <-wake:
		case <-r.Context().Done():
			return
		}
		data, off, wake = s.app.Logs.ReadFrom(off)
	}
}
