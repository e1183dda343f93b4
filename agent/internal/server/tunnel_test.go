package server

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

// dialTunnel performs the upgrade by hand and returns the relayed connection, or the refusal.
func dialTunnel(t *testing.T, h *harness, port string, upgrade bool) (net.Conn, *bufio.Reader, *http.Response) {
	t.Helper()
	u, _ := url.Parse(h.http.URL)
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /tunnel?port=" + url.QueryEscape(port) + " HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer " + testToken + "\r\n"
	if upgrade {
		req += "Connection: Upgrade\r\nUpgrade: cocoon-tunnel\r\n"
	}
	if _, err := conn.Write([]byte(req + "\r\n")); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	return conn, br, resp
}

func TestTunnel(t *testing.T) {
	h := newHarness(t)

	// An upper-casing echo server on the guest's loopback; it answers once its input ends.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				b, _ := io.ReadAll(c)
				_, _ = c.Write([]byte(strings.ToUpper(string(b))))
			}(c)
		}
	}()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)

	conn, br, resp := dialTunnel(t, h, port, true)
	if resp.StatusCode != http.StatusSwitchingProtocols || !strings.EqualFold(resp.Header.Get("Upgrade"), "cocoon-tunnel") {
		t.Fatalf("upgrade: %d %v", resp.StatusCode, resp.Header)
	}
	if _, err := conn.Write([]byte("hello through the tunnel")); err != nil {
		t.Fatal(err)
	}
	// The half-close reaches the guest server, whose answer and close come back.
	_ = conn.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "HELLO THROUGH THE TUNNEL" {
		t.Fatalf("relayed %q, %v", got, err)
	}

	// A port nothing listens on: a JSON error before any upgrade.
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedPort := strconv.Itoa(closed.Addr().(*net.TCPAddr).Port)
	closed.Close()
	var e apiError
	_, _, resp = dialTunnel(t, h, closedPort, true)
	decodeError(t, resp, &e)
	if resp.StatusCode != http.StatusBadGateway || e.Error.Code != CodeUnreachable || !strings.Contains(e.Error.Message, "port "+closedPort) {
		t.Fatalf("closed port: %d %+v", resp.StatusCode, e)
	}

	for _, bad := range []string{"", "0", "65536", "-1", "80x"} {
		_, _, resp = dialTunnel(t, h, bad, true)
		decodeError(t, resp, &e)
		if resp.StatusCode != http.StatusBadRequest || e.Error.Code != "BadRequest" {
			t.Fatalf("port %q: %d %+v", bad, resp.StatusCode, e)
		}
	}
	_, _, resp = dialTunnel(t, h, port, false)
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("without upgrade headers: %d", resp.StatusCode)
	}
	// Without the secret: 401, like every route but /health.
	if r := h.req("GET", "/tunnel?port="+port, nil, "wrong"); r.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong token: %d", r.StatusCode)
	}
}

func decodeError(t *testing.T, resp *http.Response, e *apiError) {
	t.Helper()
	defer resp.Body.Close()
	*e = apiError{}
	if err := json.NewDecoder(resp.Body).Decode(e); err != nil {
		t.Fatalf("decoding the error of a %d: %v", resp.StatusCode, err)
	}
}
