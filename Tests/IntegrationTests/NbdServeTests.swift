import Foundation
import XCTest

/// `rawmount serve` (nbdkit with rawmount's plugin) with real NBD clients: nbdinfo, nbdcopy,
/// qemu-img and qemu-io, checked against qemu-img on the image itself.
final class NbdServeTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("nbdkit")
        try Harness.tool("nbdinfo")
        try Harness.tool("nbdcopy")
    }

    /// A running `rawmount serve`: its process, and the URI it printed.
    final class Server {
        let process = Process()
        let uri: String
        private let out = Pipe()

        init(_ args: [String], binary: String = Harness.rawmount, file: StaticString = #filePath, line: UInt = #line) throws {
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["serve"] + args
            process.standardOutput = out
            process.standardError = FileHandle.standardError
            try process.run()
            // The URI is printed once nbdkit listens.
            var text = ""
            let deadline = Date().addingTimeInterval(20)
            while !text.contains("\n") && Date() < deadline && process.isRunning {
                let chunk = out.fileHandleForReading.availableData
                if chunk.isEmpty { break }
                text += String(decoding: chunk, as: UTF8.self)
            }
            uri = text.trimmingCharacters(in: .whitespacesAndNewlines)
            XCTAssertTrue(uri.hasPrefix("nbd"), "serve printed no URI: \(text)", file: file, line: line)
        }

        /// SIGTERM, as Ctrl-C would: nbdkit shuts down, the image is flushed and closed.
        func stop() -> Int32 {
            process.terminate()
            process.waitUntilExit()
            return process.terminationStatus
        }

        /// The nbdkit child's pid.
        var nbdkitPid: pid_t? {
            let children = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/task/\(process.processIdentifier)/children", encoding: .utf8)) ?? ""
            return children.split(separator: " ").first.flatMap { pid_t($0) }
        }

        deinit { if process.isRunning { process.terminate(); process.waitUntilExit() } }
    }

    /// base:allocation as qemu-nbd would give it for `image`: data, or hole+zero.
    private func qemuAllocation(_ image: String) throws -> [String] {
        let rows = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "map", "-U", "--output=json", image]).out.utf8)) as? [[String: Any]] ?? []
        var runs: [(Int, Int, Int)] = []
        for r in rows {
            let start = r["start"] as! Int, length = r["length"] as! Int, type = (r["data"] as? Bool == true) ? 0 : 3
            if let last = runs.last, last.2 == type, last.0 + last.1 == start { runs[runs.count - 1].1 += length } else { runs.append((start, length, type)) }
        }
        return runs.map { "\($0.0) \($0.1) \($0.2)" }
    }

    private func nbdAllocation(_ uri: String) throws -> [String] {
        try Harness.run(["nbdinfo", "--map", uri]).out.split(separator: "\n").map { line in
            line.split(separator: " ", omittingEmptySubsequences: true).prefix(3).joined(separator: " ")
        }
    }

    func testClientsReadTheImageAsQemuDoesAndTheirWritesLeaveItClean() throws {
        let s = try Scratch()
        let base = s.path("base.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"])
        try Harness.run(["qemu-io", "-c", "write -P 1 0 4M", "-c", "write -z 8M 1M", base])
        var images: [(String, String)] = []
        let top = s.path("top.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
        try Harness.run(["qemu-io", "-c", "write -P 2 2M 4M", top])
        images.append((top, "qcow2"))
        for fmt in ["vdi", "vmdk", "qed"] {
            let img = s.path("d.\(fmt)")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt, img, "64M"])
            try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 3 1M 3M", "-c", "write -P 4 40M 64k", img])
            images.append((img, fmt))
        }
        for (img, fmt) in images {
            let sock = s.path("\(fmt).sock")
            let server = try Server(["--unix", sock, img])
            XCTAssertEqual(server.uri, "nbd+unix:///?socket=\(sock)")
            XCTAssertEqual(try nbdAllocation(server.uri), try qemuAllocation(img), "\(fmt): nbdinfo --map against qemu-img map")
            let oracle = try s.qemuRaw(img)
            let copied = s.path("copy-\(fmt).raw"), converted = s.path("conv-\(fmt).raw")
            try Harness.run(["nbdcopy", server.uri, copied])
            try Harness.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, converted])
            XCTAssertTrue(try Files.read(copied) == oracle, "\(fmt): nbdcopy differs from qemu-img convert of the image")
            XCTAssertTrue(try Files.read(converted) == oracle, "\(fmt): qemu-img convert nbd+unix:// differs")

            // Writes, zeroes and discards through qemu-io, the same on a shadow raw copy.
            let shadow = s.path("shadow-\(fmt).raw")
            try oracle.write(to: URL(fileURLWithPath: shadow))
            let ops = ["write -P 0x5a 5M 1M", "write -P 0x6b 300k 12k", "write -z 1M 512k", "discard 2M 1M", "write -P 0x7c 63M 1M", "flush"]
            try Harness.run(["qemu-io", "-f", "raw"] + ops.flatMap { ["-c", $0] } + [server.uri])
            try Harness.run(["qemu-io", "-f", "raw"] + ops.map { $0.replacingOccurrences(of: "discard", with: "write -z") }.flatMap { ["-c", $0] } + [shadow])
            // While it is served, the image is locked as a mount locks it.
            let mount = try Harness.run([Harness.rawmount, "mount", img, s.mnt], check: false)
            XCTAssertNotEqual(mount.status, 0, "\(fmt): mounted while served")
            XCTAssertTrue(mount.err.contains("nbdkit (pid"), mount.err)
            XCTAssertEqual(server.stop(), 0, "\(fmt): serve did not stop cleanly")
            XCTAssertFalse(FileManager.default.fileExists(atPath: sock), "socket left behind")
            try Harness.run(["qemu-img", "check", "-f", fmt, img])
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, shadow, img]).status, 0, "\(fmt): image differs from the shadow")
        }
    }

    func testParallelClientsKilledClientAndKilledServer() throws {
        let s = try Scratch()
        let img = s.path("p.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "256M"])
        let shadow = s.path("shadow.raw")
        try Harness.run(["truncate", "-s", "256M", shadow])
        let sock = s.path("p.sock")
        var server = try Server(["--unix", sock, img])
        // Four writers at once on their own quarter, with a multi-connection reader alongside.
        var writers: [Process] = []
        for k in 0..<4 {
            let ops = (0..<16).flatMap { i in ["-c", "write -P \(0x10 + k) \(k * 64 + i * 4)M 1M"] } + ["-c", "flush"]
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
            p.arguments = ["-f", "raw"] + ops + [server.uri]
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            writers.append(p)
            try Harness.run(["qemu-io", "-f", "raw"] + ops + [shadow])
        }
        try Harness.run(["nbdcopy", "--connections=4", server.uri, s.path("during.raw")])
        for p in writers { p.waitUntilExit(); XCTAssertEqual(p.terminationStatus, 0) }
        let info = try Harness.run(["nbdinfo", server.uri]).out
        XCTAssertTrue(info.contains("can_multi_conn: true"), info)
        try Harness.run(["nbdcopy", "--connections=4", server.uri, s.path("after.raw")])
        XCTAssertTrue(try Files.read(s.path("after.raw")) == (try Files.read(shadow)), "four writers: the export differs from the shadow")

        // A client killed in the middle of a long write: the server goes on serving.
        let big = s.path("big.raw")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(big)", "bs=1M", "count=96", "status=none"])
        let killed = Process()
        killed.executableURL = URL(fileURLWithPath: "/usr/bin/nbdcopy")
        killed.arguments = [big, server.uri]
        try killed.run()
        usleep(150_000)
        kill(killed.processIdentifier, SIGKILL)
        killed.waitUntilExit()
        // What the killed client wrote is unknown; a known pattern goes over it, flushed.
        let after = ["write -P 0x99 0 96M", "flush"].flatMap { ["-c", $0] }
        try Harness.run(["qemu-io", "-f", "raw"] + after + [server.uri])
        try Harness.run(["qemu-io", "-f", "raw"] + after + [shadow])
        XCTAssertEqual(server.stop(), 0)
        try Harness.run(["qemu-img", "check", img])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", shadow, img]).status, 0)

        // nbdkit killed with -9 after a flushed write: the write is in the image, which
        // checks without corruption (leaks allowed, as after a killed mount), and serves again.
        server = try Server(["--unix", sock, img])
        let flushed = ["write -P 0xab 128M 2M", "flush"].flatMap { ["-c", $0] }
        try Harness.run(["qemu-io", "-f", "raw"] + flushed + [server.uri])
        try Harness.run(["qemu-io", "-f", "raw"] + flushed + [shadow])
        let pid = try XCTUnwrap(server.nbdkitPid)
        kill(pid, SIGKILL)
        server.process.waitUntilExit()
        XCTAssertNotEqual(server.process.terminationStatus, 0, "serve reports the killed server")
        let check = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertTrue(check.status == 0 || check.status == 3, check.out + check.err)
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", shadow, img]).status, 0)
        let again = try Server(["--unix", sock, img])
        XCTAssertEqual(try nbdAllocation(again.uri).count, try qemuAllocation(img).count)
        XCTAssertEqual(again.stop(), 0)
    }

    func testReadOnlyServeNeverWrites() throws {
        let s = try Scratch()
        let img = s.path("ro.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", img, "32M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 8 0 1M", img])
        let sha = try Files.sha(img)
        let server = try Server(["--read-only", "--unix", s.path("ro.sock"), img])
        let w = try Harness.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", server.uri], check: false)
        XCTAssertTrue(w.status != 0 || w.out.contains("failed") || w.err.contains("failed"), w.out + w.err)
        XCTAssertTrue(try Harness.run(["nbdinfo", server.uri]).out.contains("is_read_only: true"))
        // Read-only shares: a read-only mount of the same image works alongside.
        try s.mount(img, options: ["-r"])
        try s.unmount()
        XCTAssertEqual(server.stop(), 0)
        XCTAssertEqual(try Files.sha(img), sha)
        // TLS with a pre-shared key: a client with the key reads, one without is refused.
        let psk = s.path("keys.psk")
        try "alice:\((0..<32).map { String(format: "%02x", ($0 * 37 + 11) & 0xff) }.joined())\n".write(toFile: psk, atomically: true, encoding: .utf8)
        let tlsSock = s.path("tls.sock")
        let tls = try Server(["--read-only", "--unix", tlsSock, "--tls", "require", "--tls-psk", psk, img])
        XCTAssertEqual(tls.uri, "nbds+unix:///?socket=\(tlsSock)")
        let keyed = "nbds+unix://alice@/?socket=\(tlsSock)&tls-psk-file=\(psk)"
        XCTAssertEqual(try Harness.run(["nbdinfo", "--size", keyed]).out, "33554432\n")
        XCTAssertNotEqual(try Harness.run(["nbdinfo", "--size", "nbd+unix:///?socket=\(tlsSock)"], check: false).status, 0)
        XCTAssertEqual(tls.stop(), 0)
        // A bad image: serve fails naming it, and prints no URI.
        let bad = s.path("bad.qcow2")
        try Data(repeating: 0x51, count: 4096).write(to: URL(fileURLWithPath: bad))
        let r = try Harness.run([Harness.rawmount, "serve", "-f", "qcow2", "--unix", s.path("bad.sock"), bad], check: false)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.err.contains("bad.qcow2"), r.err)
        XCTAssertEqual(r.out, "")
    }

    /// The Unix socket of an export gives a class access only if that class may read every
    /// file the disk's bytes come from (and, writable, write the image): a world-readable
    /// overlay on a private backing file is served to its owner alone.
    func testSocketIsNoMoreOpenThanTheFilesBehindIt() throws {
        let s = try Scratch()
        let base = s.path("base.qcow2"), top = s.path("top.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top])
        chmod(top, 0o644)
        func socketMode(_ args: [String]) throws -> mode_t {
            let sock = s.path("m.sock")
            let server = try Server(args + ["--unix", sock, top])
            defer { XCTAssertEqual(server.stop(), 0) }
            XCTAssertEqual(try Harness.run(["nbdinfo", "--size", server.uri]).out, "8388608\n")
            var st = stat()
            XCTAssertEqual(stat(sock, &st), 0)
            return st.st_mode & 0o777
        }
        chmod(base, 0o600)
        XCTAssertEqual(try socketMode(["--read-only"]), 0o600, "a private backing file is served to everyone")
        chmod(base, 0o640)
        XCTAssertEqual(try socketMode(["--read-only"]), 0o660)
        chmod(base, 0o644)
        XCTAssertEqual(try socketMode(["--read-only"]), 0o666)
        // Writable: only classes that may write the image (here its owner).
        XCTAssertEqual(try socketMode([]), 0o600)
    }

    /// TCP serves loopback unless --bind says otherwise.
    func testTCPListensOnLoopbackByDefault() throws {
        let s = try Scratch()
        let img = s.path("tcp.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        let port = 20000 + Int(getpid() % 20000)
        let server = try Server(["--read-only", "--port", String(port), img])
        XCTAssertEqual(try Harness.run(["nbdinfo", "--size", server.uri]).out, "8388608\n")
        let listening = try Harness.run(["ss", "-Hltn", "sport = :\(port)"]).out
        XCTAssertFalse(listening.isEmpty, "nothing listens on \(port)")
        XCTAssertFalse(listening.contains("0.0.0.0:\(port)") || listening.contains("*:\(port)") || listening.contains("[::]:\(port)"),
                       "the export listens on every address: \(listening)")
        XCTAssertEqual(server.stop(), 0)
    }
}
