import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Runs commands and manages real FUSE mounts for the integration tests. Nothing here is
/// mocked: the tests drive the built `rawmount` binary and real peers (qemu-img, fio, ...).
struct CommandResult {
    var status: Int32
    var out: String
    var err: String
}

enum Harness {
    static let packageRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static var rawmount: String {
        if let p = ProcessInfo.processInfo.environment["RAWMOUNT_BIN"] { return p }
        return packageRoot.appendingPathComponent(".build/debug/rawmount").path
    }

    @discardableResult
    static func run(_ args: [String], input: Data? = nil, check: Bool = true,
                    file: StaticString = #filePath, line: UInt = #line) throws -> CommandResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let out = Pipe(), err = Pipe(), inp = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = input == nil ? FileHandle.nullDevice : inp
        try p.run()
        if let input {
            inp.fileHandleForWriting.write(input)
            try inp.fileHandleForWriting.close()
        }
        // Read both pipes concurrently so a chatty child cannot block on a full pipe.
        final class Box: @unchecked Sendable { var data = Data() }
        let errBox = Box()
        let group = DispatchGroup()
        group.enter()
        let errHandle = err.fileHandleForReading
        DispatchQueue.global().async { errBox.data = errHandle.readDataToEndOfFile(); group.leave() }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        let errData = errBox.data
        p.waitUntilExit()
        let r = CommandResult(status: p.terminationStatus, out: String(decoding: outData, as: UTF8.self),
                              err: String(decoding: errData, as: UTF8.self))
        if check && r.status != 0 {
            XCTFail("\(args.joined(separator: " ")) exited \(r.status): \(r.err)\(r.out.suffix(2000))", file: file, line: line)
            throw NSError(domain: "command failed", code: Int(r.status))
        }
        return r
    }

    /// Tests that need FUSE fail (not skip) under CI=true.
    static func requireFuse() throws {
        let ok = FileManager.default.fileExists(atPath: "/dev/fuse") && getuid() == 0
        if !ok {
            if ProcessInfo.processInfo.environment["CI"] == "true" {
                XCTFail("FUSE tests need /dev/fuse and root")
                throw XCTSkip("failed above")
            }
            throw XCTSkip("needs /dev/fuse and root")
        }
        XCTAssertTrue(FileManager.default.fileExists(atPath: rawmount), "build rawmount first (make test does)")
    }

    /// The host writes and syncs a command made, from the file RAWMOUNT_TEST_FAULT_REPORT
    /// named ("ops write=N sync=M ..."): the points a fault sweep can stop it at.
    static func writesAndSyncs(inReport path: String) throws -> Int {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: " ").compactMap { part -> Int? in
            guard part.hasPrefix("write=") || part.hasPrefix("sync=") else { return nil }
            return Int(part.split(separator: "=")[1].trimmingCharacters(in: .whitespacesAndNewlines))
        }.reduce(0, +)
    }

    static func tool(_ name: String) throws {
        let r = try run(["sh", "-c", "command -v \(name)"], check: false)
        if r.status != 0 {
            if ProcessInfo.processInfo.environment["CI"] == "true" { XCTFail("\(name) missing (make test installs it)") }
            throw XCTSkip("\(name) is not installed")
        }
    }
}

/// A scratch directory with a mountpoint; unmounts whatever is left on teardown.
final class Scratch {
    let dir: String
    let mnt: String
    private var mounted: [String] = []
    private var mediaMounts: [String] = []

    init() throws {
        dir = NSTemporaryDirectory() + "rawmount-test-" + UUID().uuidString.prefix(8)
        mnt = dir + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
    }

    func path(_ name: String) -> String { dir + "/" + name }

    /// kill -9 of the server at `mp` (the one `pid` names), then `waiting` (a client stuck on
    /// the mount) is waited for and the dead mount cleared, as a user would after a crash.
    func killServer(_ pid: pid_t, waiting: Process? = nil, at mp: String? = nil) throws {
        kill(pid, SIGKILL)
        waiting?.waitUntilExit()
        let cleared = try Harness.run([Harness.rawmount, "unmount", mp ?? mnt], check: false)
        // Still busy (the test holds a descriptor on it): detach it lazily, so no dead mount
        // outlives the test.
        if cleared.status != 0 { _ = try Harness.run(["umount", "-l", mp ?? mnt], check: false) }
        try forgetMount(mp ?? mnt)
    }

    /// Starts `args` (through env) without waiting: a writer a test kills the server under.
    func start(_ args: [String]) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        try p.run()
        return p
    }

    /// A 50 MiB qcow2 with data at its start, its end and in the middle: a source to convert.
    func sampleQCOW2() throws -> String {
        let src = path("sample.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", src, "50M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 3M", "-c", "write -P 0x43 47M 3M", "-c", "write -P 0x65 20M 4k", src])
        return src
    }

    /// `rawmount create ARGS IMAGE SIZE` must fail (exit 1) naming `mention`, before printing
    /// anything, and leave no file.
    func assertCreateRefused(_ args: [String], image name: String, size: String, mentions mention: String,
                             file: StaticString = #filePath, line: UInt = #line) throws {
        let image = path(name)
        let r = try Harness.run([Harness.rawmount, "create"] + args + [image, size], check: false)
        XCTAssertEqual(r.status, 1, file: file, line: line)
        XCTAssertTrue(r.err.contains(mention), r.err, file: file, line: line)
        XCTAssertEqual(r.out, "", "it announced an image it does not make", file: file, line: line)
        XCTAssertFalse(FileManager.default.fileExists(atPath: image), file: file, line: line)
    }

    /// The pid of the server serving `mp` (from its pid file).
    func serverPid(_ mp: String? = nil) throws -> pid_t? {
        let pidFile = "/run/rawmount/" + (mp ?? mnt).replacingOccurrences(of: "%", with: "%25").replacingOccurrences(of: "/", with: "%2F") + ".pid"
        return pid_t((try String(contentsOfFile: pidFile, encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Every mount logs failed requests here; a test that fails shows what the server saw.
    var serverLog: String { dir + "/server.log" }

    /// `environment`: variables for the server (e.g. RAWMOUNT_TEST_APPLY_DELAY_US).
    func mount(_ image: String, at mp: String? = nil, options extra: [String] = [], environment: [String: String] = [:]) throws {
        let env = environment.map { "\($0.key)=\($0.value)" }
        try Harness.run(env + [Harness.rawmount, "mount", "--log", serverLog] + extra + [image, mp ?? mnt])
        mounted.append(mp ?? mnt)
    }

    /// Writes a damaged image as `name`, mounts it read-only, and checks that reading at
    /// `bad` fails with EIO while reading at `good` still works.
    func assertDamageIsLocal(_ bytes: Data, name: String, bad: off_t, good: off_t,
                             file: StaticString = #filePath, line: UInt = #line) throws {
        let image = path(name)
        try bytes.write(to: URL(fileURLWithPath: image))
        try mount(image, options: ["-r"])
        let stem = name.split(separator: ".").dropLast().joined(separator: ".")
        let fd = open(mnt + "/" + stem + ".raw", O_RDONLY)
        var buf = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(pread(fd, &buf, 4096, bad), -1, "\(name): damaged range read", file: file, line: line)
        XCTAssertEqual(errno, EIO, name, file: file, line: line)
        XCTAssertEqual(pread(fd, &buf, 4096, good), 4096, "\(name): undamaged range", file: file, line: line)
        close(fd)
        try unmount()
    }

    /// `rawmount mount ARGS <scratch mnt>` must fail (exit `status`; any non-zero when nil)
    /// with a message containing each of `mentions`, and leave nothing mounted.
    func assertMountRefused(_ args: [String], status: Int32? = 1, mentions: [String], _ what: String = "",
                            file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Harness.run([Harness.rawmount, "mount"] + args + [mnt], check: false)
        if let status {
            XCTAssertEqual(r.status, status, "\(what): \(r.err)", file: file, line: line)
        } else {
            XCTAssertNotEqual(r.status, 0, "\(what): mounted", file: file, line: line)
        }
        XCTAssertTrue(mentions.allSatisfy { r.err.contains($0) }, "\(what): \(r.err)", file: file, line: line)
        XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", mnt], check: false).status, 0, "\(what): left mounted",
                          file: file, line: line)
    }

    /// One damaged copy of `bytes` per entry (`patch` written at `offset`, saved as
    /// `name.ext`): mounting it must exit 1 with a message naming the copy and containing
    /// `needle` (when not empty), and leave nothing mounted.
    func assertDamagedCopiesRefused(_ bytes: Data, ext: String, mountOptions: [String],
                                    _ damages: [(name: String, offset: Int, patch: [UInt8], needle: String)],
                                    file: StaticString = #filePath, line: UInt = #line) throws {
        for (name, off, patch, needle) in damages {
            var d = bytes
            d.replaceSubrange(off..<(off + patch.count), with: patch)
            let p = path("\(name).\(ext)")
            try d.write(to: URL(fileURLWithPath: p))
            try assertMountRefused(mountOptions + [p], mentions: ["\(name).\(ext)"] + (needle.isEmpty ? [] : [needle]), name,
                                   file: file, line: line)
        }
    }

    /// A small tmpfs at `name` inside the scratch dir (a medium to fill up or make read-only),
    /// unmounted when the scratch goes away.
    func tmpfs(_ name: String, size: String) throws -> String {
        let dir = path(name)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Harness.run(["mount", "-t", "tmpfs", "-o", "size=\(size)", "tmpfs", dir])
        mediaMounts.append(dir)
        return dir
    }

    /// A small ext4 on a loop device at `name` inside the scratch dir: a medium that can be
    /// shut down (see `shutDownFileSystem`), unmounted when the scratch goes away.
    func ext4(_ name: String, size: String) throws -> String {
        let backing = path(name + ".ext4"), dir = path(name)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Harness.run(["truncate", "-s", size, backing])
        try Harness.run(["mkfs.ext4", "-q", "-F", backing])
        try Harness.run(["mount", "-o", "loop", backing, dir])
        mediaMounts.append(dir)
        return dir
    }

    /// Makes every later write to the ext4 at `dir` fail with EIO, as a dying disk does
    /// (EXT4_IOC_SHUTDOWN, without flushing the journal).
    func shutDownFileSystem(_ dir: String) throws {
        let fd = open(dir, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { close(fd) }
        var flags: UInt32 = 2  // EXT4_GOING_FLAGS_NOLOGFLUSH
        guard ioctl(fd, 0x8004_587D, &flags) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    /// A mount the test took down itself (e.g. by killing its server and clearing it).
    func forgetMount(_ mp: String) throws { mounted.removeAll { $0 == mp } }

    /// Something the test mounted at `dir` that the scratch unmounts when it goes away.
    func registerMediaMount(_ dir: String) { mediaMounts.append(dir) }

    func unmount(_ mp: String? = nil) throws {
        try Harness.run([Harness.rawmount, "unmount", mp ?? mnt])
        mounted.removeAll { $0 == (mp ?? mnt) }
    }

    deinit {
        for m in mounted { _ = try? Harness.run([Harness.rawmount, "unmount", m], check: false) }
        for m in mounted { _ = try? Harness.run(["umount", "-l", m], check: false) }
        for m in mediaMounts { _ = try? Harness.run(["umount", "-l", m], check: false) }
        if let text = try? String(contentsOfFile: serverLog, encoding: .utf8), !text.isEmpty {
            print("server log of \(dir):\n" + text)
        }
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// `v` as `n` little-endian bytes, for patching image headers.
func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

/// The `n`-byte little-endian number at `o` in `d`, for reading image headers and tables.
func le(_ d: Data, at o: Int, _ n: Int) -> UInt64 { (0..<n).reduce(UInt64(0)) { $0 | UInt64(d[o + $1]) << (8 * UInt64($1)) } }

enum Files {
    static func read(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    /// A /proc file whole: Foundation stops after its first read there (about 4 KiB), so a
    /// mountinfo with many mounts would lose its last lines.
    static func readAll(_ path: String) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var out = [UInt8](), buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = Glibc.read(fd, &buf, buf.count)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func pwrite(_ path: String, _ bytes: [UInt8], at offset: UInt64) throws {
        let fd = open(path, O_WRONLY)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno)!) }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { Foundation.pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        guard n == bytes.count else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    /// `count` bytes at `offset` (fewer at the end of the file).
    static func pread(_ path: String, count: Int, at offset: UInt64) throws -> Data {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno)!) }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: count)
        let n = buf.withUnsafeMutableBytes { Foundation.pread(fd, $0.baseAddress, count, off_t(offset)) }
        guard n >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        return Data(buf[0..<n])
    }

    static func size(_ path: String) throws -> UInt64 {
        (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value ?? 0
    }

    static func sha(_ path: String) throws -> String {
        try Harness.run(["sha256sum", path]).out.split(separator: " ").first.map(String.init) ?? ""
    }
}

/// glibc's fallocate(2), hidden from Swift's Glibc module.
@_silgen_name("fallocate")
func fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32

extension Scratch {
    /// The user path on a mounted raw view: one DOS partition (sfdisk), a loop device at its
    /// offset, mkfs.ext4, mount, a file of `bytes` bytes, umount, e2fsck. Fails the test on
    /// any step.
    func partitionFormatAndCheck(raw: String, bytes: Int, fill: UInt8) throws {
        try Harness.tool("mkfs.ext4")
        try Harness.run(["sfdisk", "-q", raw], input: Data("label: dos\n,,L\n".utf8))
        let loop = try Harness.run(["losetup", "--show", "-f", "-o", "1048576", raw]).out.trimmingCharacters(in: .whitespacesAndNewlines)
        let fsdir = path("fs")
        try FileManager.default.createDirectory(atPath: fsdir, withIntermediateDirectories: true)
        defer { _ = try? Harness.run(["umount", fsdir], check: false); _ = try? Harness.run(["losetup", "-d", loop], check: false) }
        try Harness.run(["mkfs.ext4", "-q", loop])
        try Harness.run(["mount", loop, fsdir])
        try Data(repeating: fill, count: bytes).write(to: URL(fileURLWithPath: fsdir + "/payload"))
        try Harness.run(["umount", fsdir])
        try Harness.run(["e2fsck", "-fn", loop])
    }
}

extension Scratch {
    /// The oracle's view of an image: `qemu-img convert -O raw`, read into memory.
    func qemuRaw(_ image: String) throws -> Data {
        let out = path("oracle-\(UUID().uuidString.prefix(6)).raw")
        try Harness.run(["qemu-img", "convert", "-U", "-O", "raw", image, out])
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try Files.read(out)
    }
}
