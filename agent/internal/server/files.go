package server

import (
	"io"
	"io/fs"
	"net/http"
	"strconv"

	"cocoon/agent/internal/apierr"
	"cocoon/agent/internal/filesystem"
	"cocoon/agent/internal/process"
)

func queryPath(r *http.Request) (string, error) {
	return filesystem.CleanPath(r.URL.Query().Get("path"))
}

func queryOwner(r *http.Request) (*filesystem.Owner, error) {
	name := r.URL.Query().Get("user")
	if name == "" {
		return nil, nil
	}
	uid, gid, err := process.Owner(name)
	if err != nil {
		return nil, err
	}
	return &filesystem.Owner{UID: uid, GID: gid}, nil
}

func (s *Server) getFile(w http.ResponseWriter, r *http.Request) {
	p, err := queryPath(r)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	f, size, list, err := filesystem.Open(p)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	if list != nil {
		writeJSON(w, http.StatusOK, list)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	if size == 0 {
		// /proc and /sys files report size 0 yet have content: send what a
		// read to EOF gives, without a Content-Length (chunked).
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = io.Copy(w, f)
		}
		return
	}
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	// CopyN: a file that grows meanwhile must not overrun Content-Length.
	_, _ = io.CopyN(w, f, size)
}

func (s *Server) statFile(w http.ResponseWriter, r *http.Request) {
	p, err := queryPath(r)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	in, err := filesystem.Stat(p)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, in)
}

func (s *Server) putFile(w http.ResponseWriter, r *http.Request) {
	p, err := queryPath(r)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	var mode *fs.FileMode
	if ms := r.URL.Query().Get("mode"); ms != "" {
		m, err := filesystem.ParseMode(ms, 0)
		if err != nil {
			apierr.Write(w, err)
			return
		}
		mode = &m
	}
	owner, err := queryOwner(r)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	n, err := filesystem.Write(p, r.Body, mode, owner)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]interface{}{"path": p, "size": n})
}

func (s *Server) mkdir(w http.ResponseWriter, r *http.Request) {
	p, err := queryPath(r)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	owner, err := queryOwner(r)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	if err := filesystem.Mkdir(p, owner); err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]interface{}{"ok": true, "path": p})
}

func (s *Server) deleteFile(w http.ResponseWriter, r *http.Request) {
	p, err := queryPath(r)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	recursive, _ := strconv.ParseBool(r.URL.Query().Get("recursive"))
	if err := filesystem.Remove(p, recursive); err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, okBody)
}
