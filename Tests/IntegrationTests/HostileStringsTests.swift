import XCTest
import Foundation

/// Strings from images and file names never forge a line or drive a terminal: not in the
/// log, not on stderr or stdout, not in the mount's status pipe; the log is never opened
/// through a symlink; extreme numbers in tables are errors or clipped, never a trap.
final class HostileStringsTests: XCTestCase {
    /// An image file name with a newline and "error: " after it: the detached mount's status
    /// pipe is framed, so the parent neither reports a forged error nor waits forever, and
    /// the log gets one line per record.
    func testNewlinesInAnImageNameForgeNoLine() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("a\nerror: forged.img")
        try Harness.run(["truncate", "-s", "4M", img])
        let r = try Harness.run([Harness.rawmount, "mount", "--log", s.serverLog, img, s.mnt], check: false)
        XCTAssertEqual(r.status, 0, "a forged verdict: \(r.err)")
        XCTAssertFalse(r.err.contains("rawmount: forged"), r.err)
        XCTAssertTrue(r.out.contains("a\\nerror: forged.raw"), "the file line is not escaped: \(r.out)")
        let raw = s.mnt + "/a\nerror: forged.raw"
        XCTAssertTrue(FileManager.default.fileExists(atPath: raw))
        // A logged failure naming the image: a QED header into the first sector of a probed raw image.
        let qed = [UInt8]("QED\0".utf8) + [UInt8](repeating: 0, count: 508)
        XCTAssertThrowsError(try Files.pwrite(raw, qed, at: 0))
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        let log = try String(contentsOfFile: s.serverLog, encoding: .utf8)
        XCTAssertTrue(log.contains("a\\nerror: forged.img"), log)
        for line in log.split(separator: "\n") { XCTAssertTrue(line.hasPrefix("20"), "a forged log line: \(line)") }
    }

    /// Terminal escapes in a snapshot name and a bitmap name: written out in `info`,
    /// `bitmap list` and their JSON, never sent raw.
    func testEscapeSequencesInNamesAreWrittenOut() throws {
        let s = try Scratch()
        let img = s.path("esc.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        try Harness.run(["qemu-img", "snapshot", "-c", "\u{1b}]0;owned\u{07}\u{1b}[31mred", img])
        try Harness.run(["qemu-img", "bitmap", "--add", img, "b\u{1b}[2Jclear\u{9b}31m"])
        try Harness.run(["qemu-img", "snapshot", "-c", "n\nvirtual size: forged", img])
        let info = try Harness.run([Harness.rawmount, "info", img]).out
        XCTAssertFalse(info.split(separator: "\n").contains { $0.hasPrefix("virtual size: forged") }, "a forged info line: \(info)")
        XCTAssertTrue(info.contains("n\\nvirtual size: forged"), info)
        for args in [["info", img], ["info", "--json", img], ["bitmap", "list", img], ["bitmap", "list", "--json", img]] {
            let r = try Harness.run([Harness.rawmount] + args)
            XCTAssertFalse(r.out.unicodeScalars.contains { $0.value == 0x1b || $0.value == 0x07 || $0.value == 0x9b },
                           "\(args): a control character reached stdout: \(r.out.debugDescription)")
            XCTAssertTrue(r.out.contains("red") || r.out.contains("clear"), "\(args): \(r.out)")
        }
    }

    /// `--log` naming a symlink: refused by name, nothing mounted, the link's target untouched.
    func testLogThroughASymlinkIsRefused() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("l.img")
        try Harness.run(["truncate", "-s", "4M", img])
        let target = s.path("precious")
        try "keep\n".write(toFile: target, atomically: false, encoding: .utf8)
        let link = s.path("log")
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: target)
        let r = try Harness.run([Harness.rawmount, "mount", "--log", link, img, s.mnt], check: false)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.err.contains("symbolic link") && r.err.contains(link), r.err)
        XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0)
        XCTAssertEqual(try String(contentsOfFile: target, encoding: .utf8), "keep\n")
    }

    /// A GPT entry ending at LBA 2^64-1 and a qcow2 snapshot of 2^64-512 bytes: clipped with
    /// a note, or refused with a message; never a trap.
    func testExtremeNumbersInTablesDoNotTrap() throws {
        let s = try Scratch()
        let disk = s.path("gpt.img")
        try Harness.run(["truncate", "-s", "8M", disk])
        try Harness.run(["sfdisk", "-q", disk], input: Data("label: gpt\nstart=2048, size=4096\n".utf8))
        // Entry 1's last LBA -> 2^64-1, CRCs fixed so the table is taken as valid.
        try Harness.run(["python3", "-c", """
            import struct, sys, zlib
            p = sys.argv[1]
            d = bytearray(open(p, 'rb').read())
            h = 512
            entries = struct.unpack_from('<Q', d, h + 72)[0] * 512
            n, size = struct.unpack_from('<II', d, h + 80)
            struct.pack_into('<Q', d, entries + 40, 2**64 - 1)
            struct.pack_into('<I', d, h + 88, zlib.crc32(bytes(d[entries:entries + n * size])))
            hs = struct.unpack_from('<I', d, h + 12)[0]
            struct.pack_into('<I', d, h + 16, 0)
            struct.pack_into('<I', d, h + 16, zlib.crc32(bytes(d[h:h + hs])))
            open(p, 'wb').write(d)
            """, disk])
        let info = try Harness.run([Harness.rawmount, "info", disk], check: false)
        XCTAssertEqual(info.status, 0, info.err)
        XCTAssertTrue(info.out.contains("partition 1") && info.out.contains("clipped"), info.out)
        try Harness.run([Harness.rawmount, "hash", disk])

        let img = s.path("snap.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        try Harness.run(["qemu-img", "snapshot", "-c", "s1", img])
        let d = try Data(contentsOf: URL(fileURLWithPath: img))
        let table = (64..<72).reduce(UInt64(0)) { $0 << 8 | UInt64(d[$1]) }
        try Files.pwrite(img, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, 0x00], at: table + 48)
        for args in [["mount", "--snapshot", "s1", img, s.mnt], ["convert", "-l", "s1", "-O", "raw", img, s.path("out.raw")]] {
            let r = try Harness.run([Harness.rawmount] + args, check: false)
            XCTAssertEqual(r.status, 1, "\(args): \(r.err)")
            XCTAssertTrue(r.err.contains("snap.qcow2") && r.err.contains("snapshot"), "\(args): \(r.err)")
        }
    }

    /// `rawmount mount -- -x.img DIR`: the detached server keeps its own option before the `--`.
    func testImageNameStartingWithADash() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        try Harness.run(["truncate", "-s", "4M", s.path("-x.img")])
        try Harness.run(["sh", "-c", "cd \"$1\" && \"$2\" mount -- -x.img mnt", "sh", s.dir, Harness.rawmount])
        XCTAssertTrue(FileManager.default.fileExists(atPath: s.mnt + "/-x.raw"))
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
    }

    /// The checked mountpoint is swapped for a symlink while the image opens (a slow backing
    /// chain makes that easy): a root mount still lands on the directory that was checked,
    /// never on what the link names.
    func testMountpointSwappedDuringTheOpenIsNotFollowed() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("swap.img")
        try Harness.run(["truncate", "-s", "4M", img])
        let victim = s.path("victim"), checked = s.path("checked"), moved = s.path("moved")
        try FileManager.default.createDirectory(atPath: victim, withIntermediateDirectories: true)
        try "secret\n".write(toFile: victim + "/shadow", atomically: false, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: checked, withIntermediateDirectories: true)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["RAWMOUNT_TEST_PAUSE_BEFORE_MOUNT_US=1500000", Harness.rawmount, "mount", img, checked]
        try p.run()
        usleep(700_000)  // the server has checked the mountpoint and waits
        try FileManager.default.moveItem(atPath: checked, toPath: moved)
        try FileManager.default.createSymbolicLink(atPath: checked, withDestinationPath: victim)
        p.waitUntilExit()
        defer {
            _ = try? Harness.run(["umount", "-l", moved], check: false)
            _ = try? Harness.run(["umount", "-l", victim], check: false)
        }
        XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", victim], check: false).status, 0, "the mount followed the swapped-in link")
        XCTAssertEqual(try String(contentsOfFile: victim + "/shadow", encoding: .utf8), "secret\n")
        if p.terminationStatus == 0 {
            XCTAssertEqual(try Harness.run(["mountpoint", "-q", moved], check: false).status, 0, "mounted, but not on the checked directory")
            XCTAssertTrue(FileManager.default.fileExists(atPath: moved + "/swap.raw"))
            // Stopped by a signal, the server unmounts where the directory is now, not the
            // swapped-in name.
            try Harness.run(["pkill", "-TERM", "-f", "rawmount mount \(img) \(checked)"])
            var gone = false
            for _ in 0..<50 where !gone {
                usleep(100_000)
                gone = try Harness.run(["mountpoint", "-q", moved], check: false).status != 0
            }
            XCTAssertTrue(gone, "the server left its mount behind at the renamed directory")
        }
    }

    /// The raw file is never more readable than the files its bytes come from: a world-
    /// readable qcow2 over a backing file only its owner may read shows as 0600, so
    /// `-o allow_other` opens no way around the backing file's mode.
    func testRawFileIsNoMoreReadableThanItsBackingFile() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let base = s.path("private.raw"), top = s.path("top.qcow2")
        try Harness.run(["truncate", "-s", "4M", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top])
        XCTAssertEqual(chmod(base, 0o600), 0)
        XCTAssertEqual(chmod(top, 0o644), 0)
        func shownMode() throws -> mode_t {
            try s.mount(top, options: ["-o", "allow_other"])
            defer { try? s.unmount() }
            var st = stat()
            XCTAssertEqual(stat(s.mnt + "/top.raw", &st), 0)
            return st.st_mode & 0o777
        }
        XCTAssertEqual(try shownMode(), 0o600, "others may read the private backing file's bytes")
        XCTAssertEqual(chmod(base, 0o644), 0)
        XCTAssertEqual(try shownMode(), 0o644)
    }

    /// A mistyped verb is not taken for an image path: the verb is suggested, nothing mounted.
    func testMistypedVerbIsSuggested() throws {
        let s = try Scratch()
        for (typed, verb) in [("umount", "unmount"), ("lsit", "list"), ("inof", "info")] {
            let r = try Harness.run([Harness.rawmount, typed, s.mnt], check: false)
            XCTAssertEqual(r.status, 1, typed)
            XCTAssertTrue(r.err.contains("did you mean '\(verb)'"), "\(typed): \(r.err)")
        }
        // An existing file of that name is still an image (here: a mountpoint that is missing).
        try Harness.run(["truncate", "-s", "1M", s.path("lsit")])
        let r = try Harness.run(["sh", "-c", "cd \"$1\" && exec \"$2\" lsit ./missing-dir", "sh", s.path(""), Harness.rawmount], check: false)
        XCTAssertFalse(r.err.contains("did you mean"), r.err)
        XCTAssertTrue(r.err.contains("missing-dir"), r.err)
    }

    /// Sizes a user types that no file can hold: refused with a reason, never a trap.
    func testHugeSizesAreRefusedNotTraps() throws {
        let s = try Scratch()
        for (fmt, size, words) in [("raw", "15E", "File too large"), ("raw", "20E", "too large"), ("qcow2", "99999999999999999999999", "too large"),
                                   ("qcow2", "15E", "2^63-1"), ("vmdk", "15E", "large")] {
            let img = s.path("huge.\(fmt)")
            let r = try Harness.run([Harness.rawmount, "create", "-q", "-f", fmt, img, size], check: false)
            XCTAssertEqual(r.status, 1, "\(fmt) \(size): \(r.err)")
            XCTAssertTrue(r.err.contains(words) && !r.err.contains("Fatal error"), "\(fmt) \(size): \(r.err)")
        }
    }

    /// `list` escapes each field: a mountpoint with a newline and an image name with a tab
    /// make one row of four columns, not a forged row or column.
    func testListRowsCannotBeForged() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("x\ty.img")
        try Harness.run(["truncate", "-s", "1M", img])
        let mp = s.path("a\nb")
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        try s.mount(img, at: mp, options: ["-r"])
        let rows = try Harness.run([Harness.rawmount, "list"]).out.split(separator: "\n").filter { $0.contains("x\\ty.img") }
        XCTAssertEqual(rows.count, 1, "\(rows)")
        XCTAssertEqual(rows.first?.split(separator: "\t", omittingEmptySubsequences: false).count, 4, "\(rows)")
        XCTAssertTrue(rows.first?.contains("a\\nb") ?? false, "\(rows)")
        try s.unmount(mp)
    }
}
