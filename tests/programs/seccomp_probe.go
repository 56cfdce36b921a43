// seccomp_probe: a static Go program (CGO_ENABLED=0) the seccomp tests run
// under `graft`. Standard library only.
//
//	tcp-serve ADDR         accept one connection, write "peer=REMOTE\n"
//	tcp-serve-n ADDR N     the same for N connections, one after another
//	tcp-get ADDR MSG       connect, send MSG, print what comes back
//	tcp-get-n ADDR N       N times, 50 ms apart: connect, send "x", print
//	                       "got ANSWER" or "fail ERROR"; then "failures K"
//	udp-serve ADDR         answer one datagram with "peer=REMOTE data=DATA"
//	udp-ask ADDR MSG       connected UDP: send MSG, print the answer
//	udp-sendto ADDR MSG    unconnected UDP bound to port 0: WriteTo, print answer
//	resolve NAME           Go's own DNS resolver (no cgo), print addresses
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

func die(err error) {
	fmt.Fprintf(os.Stderr, "probe: %v\n", err)
	os.Exit(1)
}

// getOnce connects to addr, sends "x", half-closes and returns the answer.
func getOnce(addr string) ([]byte, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "x")
	c.(*net.TCPConn).CloseWrite()
	return io.ReadAll(c)
}

func main() {
	if len(os.Args) < 3 {
		die(fmt.Errorf("usage: seccomp_probe MODE ADDR [MSG]"))
	}
	mode, addr := os.Args[1], os.Args[2]
	msg := ""
	if len(os.Args) > 3 {
		msg = os.Args[3]
	}
	deadline := time.Now().Add(20 * time.Second)
	switch mode {
	case "tcp-serve", "tcp-serve-n":
		n := 1
		if mode == "tcp-serve-n" {
			if _, err := fmt.Sscan(msg, &n); err != nil {
				die(err)
			}
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			die(err)
		}
		fmt.Printf("listening %s\n", l.Addr())
		for i := 0; i < n; i++ {
			c, err := l.Accept()
			if err != nil {
				die(err)
			}
			fmt.Fprintf(c, "peer=%s\n", c.RemoteAddr())
			// Half-close, then drain what the client sent: closing with
			// unread data would reset the connection under the client's read.
			c.(*net.TCPConn).CloseWrite()
			c.SetDeadline(deadline)
			io.Copy(io.Discard, c)
			c.Close()
		}
	case "tcp-get":
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			die(err)
		}
		c.SetDeadline(deadline)
		io.WriteString(c, msg)
		c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c)
		if err != nil {
			die(err)
		}
		fmt.Printf("got %s\n", b)
	case "tcp-get-n":
		n, fails := 0, 0
		if _, err := fmt.Sscan(msg, &n); err != nil {
			die(err)
		}
		for i := 0; i < n; i++ {
			b, err := getOnce(addr)
			if err != nil {
				fails++
				fmt.Printf("fail %v\n", err)
			} else {
				fmt.Printf("got %s\n", b)
			}
			time.Sleep(50 * time.Millisecond)
		}
		fmt.Printf("failures %d\n", fails)
	case "udp-serve":
		p, err := net.ListenPacket("udp", addr)
		if err != nil {
			die(err)
		}
		fmt.Printf("listening %s\n", p.LocalAddr())
		p.SetDeadline(deadline)
		b := make([]byte, 1500)
		n, from, err := p.ReadFrom(b)
		if err != nil {
			die(err)
		}
		if _, err := p.WriteTo([]byte(fmt.Sprintf("peer=%s data=%s", from, b[:n])), from); err != nil {
			die(err)
		}
	case "udp-ask":
		c, err := net.Dial("udp", addr)
		if err != nil {
			die(err)
		}
		c.SetDeadline(deadline)
		if _, err := io.WriteString(c, msg); err != nil {
			die(err)
		}
		b := make([]byte, 1500)
		n, err := c.Read(b)
		if err != nil {
			die(err)
		}
		fmt.Printf("got %s\n", b[:n])
	case "udp-sendto":
		p, err := net.ListenPacket("udp", ":0")
		if err != nil {
			die(err)
		}
		p.SetDeadline(deadline)
		to, err := net.ResolveUDPAddr("udp", addr)
		if err != nil {
			die(err)
		}
		if _, err := p.WriteTo([]byte(msg), to); err != nil {
			die(err)
		}
		b := make([]byte, 1500)
		n, _, err := p.ReadFrom(b)
		if err != nil {
			die(err)
		}
		fmt.Printf("got %s\n", b[:n])
	case "resolve":
		r := &net.Resolver{PreferGo: true}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		a, err := r.LookupHost(ctx, addr)
		if err != nil {
			die(err)
		}
		for _, x := range a {
			fmt.Printf("addr %s\n", x)
		}
	default:
		die(fmt.Errorf("unknown mode %q", mode))
	}
}
