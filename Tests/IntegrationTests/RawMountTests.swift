import Foundation
import XCTest
import TestSupport

/// The raw path end to end through real FUSE mounts, with peers as oracles.
final class RawMountTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testDirectoryMountShowsNamedRawFileWithImageSize() throws {
        let s = try Scratch()
        let img = s.path("win.img")
        try Harness.run(["truncate", "-s", "48M", img])
        try s.mount(img)
        let attrs = try FileManager.default.attributesOfItem(atPath: s.mnt + "/win.raw")
        XCTAssertEqual((attrs[.size] as? NSNumber)?.uint64Value, 48 << 20)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.mnt), ["win.raw"])
        let blk = try Harness.run(["stat", "-c", "%o", s.mnt + "/win.raw"]).out
        XCTAssertEqual(blk.trimmingCharacters(in: .whitespacesAndNewlines), "65536")
        let list = try Harness.run([Harness.rawmount, "list"]).out
        XCTAssertTrue(list.contains("\(s.mnt)\t\(img)\trw"), list)
        // A second image on the same mountpoint is refused rather than stacked on top.
        let other = s.path("other.img")
        try Harness.run(["truncate", "-s", "1M", other])
        let stacked = try Harness.run([Harness.rawmount, "mount", other, s.mnt], check: false)
        XCTAssertEqual(stacked.status, 1, stacked.err)
        XCTAssertTrue(stacked.err.contains("already shows \(img)"), stacked.err)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.mnt), ["win.raw"])
        try s.unmount()
        XCTAssertFalse(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status == 0)
        // Through a symlink, the raw file is named as the user named the image.
        try FileManager.default.createSymbolicLink(atPath: s.path("vm-disk.img"), withDestinationPath: img)
        try s.mount(s.path("vm-disk.img"))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.mnt), ["vm-disk.raw"])
        try s.unmount()
    }

    /// `check` on a format without one answers as qemu-img does: exit 63, not "clean".
    func testCheckOfAFormatWithoutOneExitsLikeQemuImg() throws {
        let s = try Scratch()
        let img = s.path("plain.img")
        try Harness.run(["truncate", "-s", "4M", img])
        let qemu = try Harness.run(["qemu-img", "check", "-f", "raw", img], check: false)
        let ours = try Harness.run([Harness.rawmount, "check", img], check: false)
        XCTAssertEqual(ours.status, qemu.status, "qemu-img: \(qemu.err)")
        XCTAssertEqual(ours.status, 63)
        XCTAssertTrue(ours.err.contains("does not support checks") && ours.err.contains(img), ours.err)
    }

    func testRandomUnalignedWritesMatchShadow() throws {
        let s = try Scratch()
        let img = s.path("disk.img"), shadow = s.path("shadow")
        let size: UInt64 = 24 << 20
        var rng = SeededRandom(seed: 42)
        // Start from random content so untouched bytes are checked too.
        XCTAssertTrue(FileManager.default.createFile(atPath: img, contents: Data(rng.bytes(Int(size)))))
        try FileManager.default.copyItem(atPath: img, toPath: shadow)
        // The image's times are in the past: the raw file's mtime must move when it is written.
        try Harness.run(["touch", "-d", "2001-01-01", img])
        try s.mount(img)
        let raw = s.mnt + "/disk.raw"
        for _ in 0..<300 {
            let len = Int(rng.next() % 200_000) + 1
            let off = rng.next() % (size - UInt64(len))
            let data = rng.bytes(len)
            try Files.pwrite(raw, data, at: off)
            try Files.pwrite(shadow, data, at: off)
        }
        XCTAssertEqual(try Files.read(raw), try Files.read(shadow), "read back through the mount")
        let mtime = (try FileManager.default.attributesOfItem(atPath: raw)[.modificationDate] as? Date) ?? .distantPast
        XCTAssertGreaterThan(mtime, Date(timeIntervalSinceNow: -600), "mtime did not follow the writes")
        try s.unmount()
        XCTAssertEqual(try Files.read(img), try Files.read(shadow), "image after unmount")
    }

    func testPartitionMkfsLoopMountAndFsck() throws {
        try Harness.tool("sfdisk"); try Harness.tool("mkfs.ext4")
        let s = try Scratch()
        let img = s.path("disk.img")
        try Harness.run(["truncate", "-s", "96M", img])
        try s.mount(img)
        let raw = s.mnt + "/disk.raw"
        try Harness.run(["sfdisk", "-q", raw], input: Data("label: dos\n,64M,L\n,,L\n".utf8))
        let parts = try Harness.run(["partx", "-g", "-o", "START,SECTORS", "-n", "1", raw]).out
            .split(separator: " ", omittingEmptySubsequences: true).compactMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        XCTAssertEqual(parts, [2048, 131072])
        let loop = try Harness.run(["losetup", "--show", "-f", "-o", "\(parts[0] * 512)", "--sizelimit", "\(parts[1] * 512)", raw])
            .out.trimmingCharacters(in: .whitespacesAndNewlines)
        let fsdir = s.path("fs")
        try FileManager.default.createDirectory(atPath: fsdir, withIntermediateDirectories: true)
        defer { _ = try? Harness.run(["umount", fsdir], check: false); _ = try? Harness.run(["losetup", "-d", loop], check: false) }
        try Harness.run(["mkfs.ext4", "-q", loop])
        try Harness.run(["mount", loop, fsdir])
        let payload = Data((0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        try payload.write(to: URL(fileURLWithPath: fsdir + "/payload.bin"))
        try Harness.run(["umount", fsdir])
        try Harness.run(["e2fsck", "-fn", loop])
        try Harness.run(["losetup", "-d", loop])
        try s.unmount()
        // The file system is in the image itself: check it there with a fresh loop device.
        let loop2 = try Harness.run(["losetup", "--show", "-f", "-r", "-o", "\(parts[0] * 512)", "--sizelimit", "\(parts[1] * 512)", img])
            .out.trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? Harness.run(["losetup", "-d", loop2], check: false) }
        try Harness.run(["e2fsck", "-fn", loop2])
        let got = try Harness.run(["debugfs", "-R", "cat /payload.bin", loop2]).out
        XCTAssertEqual(got.utf8.count >= 0, true)
        let dumped = s.path("dumped")
        try Harness.run(["debugfs", "-R", "dump /payload.bin \(dumped)", loop2])
        XCTAssertEqual(try Files.read(dumped), payload)
    }

    func testSeekDataHoleAndPunchHole() throws {
        let s = try Scratch()
        let img = s.path("sparse.img")
        try Harness.run(["truncate", "-s", "16M", img])
        try Files.pwrite(img, [UInt8](repeating: 0xAB, count: 1 << 20), at: 4 << 20)
        try s.mount(img)
        let raw = s.mnt + "/sparse.raw"
        let fd = open(raw, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(lseek(fd, 0, 3 /* SEEK_DATA */), 4 << 20)
        XCTAssertEqual(lseek(fd, 4 << 20, 4 /* SEEK_HOLE */), 5 << 20)
        XCTAssertEqual(lseek(fd, 6 << 20, 3), -1)
        XCTAssertEqual(errno, ENXIO)
        XCTAssertEqual(lseek(fd, 6 << 20, 4), 6 << 20, "a hole starts where we are")
        var tail = [UInt8](repeating: 0x11, count: 4096)
        XCTAssertEqual(pwrite(fd, &tail, 4096, (16 << 20) - 4096), 4096)
        XCTAssertEqual(lseek(fd, (16 << 20) - 4096, 4), 16 << 20, "end of disk is a hole")
        // Punch an unaligned hole: those bytes read zeros, neighbours keep their data.
        XCTAssertEqual(fallocate(fd, 0x02 | 0x01, (4 << 20) + 1000, 70_000), 0)
        var buf = [UInt8](repeating: 1, count: 72_000)
        XCTAssertEqual(pread(fd, &buf, buf.count, (4 << 20)), buf.count)
        XCTAssertTrue(buf[0..<1000].allSatisfy { $0 == 0xAB })
        XCTAssertTrue(buf[1000..<71_000].allSatisfy { $0 == 0 })
        XCTAssertTrue(buf[71_000...].allSatisfy { $0 == 0xAB })
        // Zero range without keep-size inside the disk.
        XCTAssertEqual(fallocate(fd, 0x10, (4 << 20) + 200_000, 5000), 0)
        XCTAssertEqual(pread(fd, &buf, 5000, (4 << 20) + 200_000), 5000)
        XCTAssertTrue(buf[0..<5000].allSatisfy { $0 == 0 })
        // Growing the file is refused: the disk has a fixed size.
        XCTAssertEqual(fallocate(fd, 0, 15 << 20, 2 << 20), -1)
        XCTAssertEqual(ftruncate(fd, 8 << 20), -1)
        XCTAssertEqual(ftruncate(fd, 16 << 20), 0, "same-size truncate is accepted")
        close(fd)
        try s.unmount()
        let data = try Files.read(img)
        XCTAssertEqual(data.count, 16 << 20)
        XCTAssertTrue(data[(4 << 20) + 1000 ..< (4 << 20) + 71_000].allSatisfy { $0 == 0 })
        XCTAssertEqual(data[(4 << 20) + 500], 0xAB)
    }

    func testWritesPastTheEndFailAndSizeNeverChanges() throws {
        let s = try Scratch()
        let img = s.path("d.img")
        try Harness.run(["truncate", "-s", "1M", img])
        try s.mount(img)
        let raw = s.mnt + "/d.raw"
        let fd = open(raw, O_WRONLY)
        var b = [UInt8](repeating: 9, count: 4096)
        XCTAssertEqual(pwrite(fd, &b, 4096, 1 << 20), -1)
        XCTAssertEqual(errno, ENOSPC)
        XCTAssertEqual(pwrite(fd, &b, 4096, (1 << 20) - 1000), 1000, "a write running past the end is cut short")
        close(fd)
        // O_TRUNC leaves the disk intact.
        let t = open(raw, O_WRONLY | O_TRUNC)
        XCTAssertGreaterThanOrEqual(t, 0); close(t)
        let attrs = try FileManager.default.attributesOfItem(atPath: raw)
        XCTAssertEqual((attrs[.size] as? NSNumber)?.intValue, 1 << 20)
        try s.unmount()
        let data = try Files.read(img)
        XCTAssertEqual(data.count, 1 << 20)
        XCTAssertTrue(data.suffix(1000).allSatisfy { $0 == 9 })
    }

    func testODirectQemuImgConvertIntoMount() throws {
        try Harness.tool("qemu-img")
        let s = try Scratch()
        let src = s.path("src.qcow2"), img = s.path("target.img")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", src, "32M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0x33 17M 1536k",
                         "-c", "write -P 0x71 31M 512", src])
        try Harness.run(["truncate", "-s", "32M", img])
        try Harness.run(["dd", "if=/dev/urandom", "of=\(img)", "bs=1M", "count=32", "conv=notrunc", "status=none"])
        try s.mount(img)
        try Harness.run(["qemu-img", "convert", "-n", "-t", "none", "-f", "qcow2", "-O", "raw", src, s.mnt + "/target.raw"])
        try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, s.mnt + "/target.raw"])
        try s.unmount()
        try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, img])
    }

    func testParallelFioVerifyWriters() throws {
        try Harness.tool("fio")
        let s = try Scratch()
        let img = s.path("fio.img")
        try Harness.run(["truncate", "-s", "64M", img])
        try s.mount(img)
        let r = try Harness.run(["fio", "--name=verify", "--filename=\(s.mnt)/fio.raw", "--rw=randwrite", "--bs=4k",
                                 "--bsrange=512-64k", "--numjobs=4", "--size=16M", "--offset_increment=16M",
                                 "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--ioengine=psync",
                                 "--group_reporting", "--output-format=terse", "--verify_state_save=0"])
        XCTAssertFalse(r.out.isEmpty)
        let direct = try Harness.run(["fio", "--name=directverify", "--filename=\(s.mnt)/fio.raw", "--rw=randwrite", "--bs=4k",
                                      "--numjobs=4", "--size=8M", "--offset_increment=16M", "--direct=1",
                                      "--verify=md5", "--verify_fatal=1", "--ioengine=psync", "--group_reporting",
                                      "--verify_state_save=0"])
        XCTAssertTrue(direct.out.contains("err= 0"), direct.out)
        try s.unmount()
    }

    /// A user without root: the mount goes through fusermount3, the pid file lives in the
    /// user's own directory, and `unmount` works without privileges. Where that user cannot
    /// open /dev/fuse, the error says so (first with the machine's mode, then with 0666).
    func testUnprivilegedUserMountsWritesAndUnmounts() throws {
        try Harness.tool("setpriv")
        try Harness.tool("fusermount3")
        let s = try Scratch()
        let bin = s.path("rawmount")
        try FileManager.default.copyItem(atPath: Harness.rawmount, toPath: bin)
        let img = s.path("user.qed"), src = s.path("src.bin")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "16M"])
        try Harness.run(["dd", "if=/dev/urandom", "of=\(src)", "bs=1M", "count=3", "status=none"])
        try Harness.run(["chmod", "0777", s.dir, s.mnt])
        try Harness.run(["chmod", "0755", bin])
        try Harness.run(["chmod", "0644", src])
        try Harness.run(["chown", "65534:65534", img])
        let asNobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "HOME=/tmp"]
        var st = stat()
        XCTAssertEqual(stat("/dev/fuse", &st), 0)
        let originalMode = st.st_mode & 0o777
        defer { chmod("/dev/fuse", originalMode) }
        for mode in Set([originalMode, 0o666]).sorted() {
            XCTAssertEqual(chmod("/dev/fuse", mode), 0)
            let r = try Harness.run(asNobody + [bin, "mount", img, s.mnt], check: false)
            if mode & 0o006 != 0o006 {
                XCTAssertEqual(r.status, 1, r.err)
                XCTAssertTrue(r.err.contains("/dev/fuse") && r.err.contains("Permission denied"), r.err)
                XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0)
                continue
            }
            XCTAssertEqual(r.status, 0, r.err)
            try Harness.run(asNobody + ["dd", "if=\(src)", "of=\(s.mnt)/user.raw", "bs=1M", "seek=2", "conv=notrunc", "status=none"])
            try Harness.run(asNobody + ["cmp", "-n", "3145728", "-i", "0:2097152", src, s.mnt + "/user.raw"])
            let u = try Harness.run(asNobody + [bin, "unmount", s.mnt], check: false)
            XCTAssertEqual(u.status, 0, u.err)
            XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0)
            XCTAssertFalse(FileManager.default.fileExists(atPath: "/tmp/rawmount-65534/" + s.mnt.replacingOccurrences(of: "/", with: "%2F") + ".pid"))
            try Harness.run(["qemu-img", "check", img])
            let image = try s.qemuRaw(img)
            XCTAssertEqual(image.prefix(2 << 20), Data(count: 2 << 20))
            XCTAssertTrue(image.subdata(in: 2 << 20 ..< 5 << 20) == (try Files.read(src)), "written data not in the image")
        }
    }

    /// Evidence on a read-only medium: a plain mount fails, naming the file and pointing at
    /// --read-only; with it the image reads as the oracle does.
    func testImageOnReadOnlyMediumPointsToReadOnly() throws {
        let s = try Scratch()
        let medium = try s.tmpfs("medium", size: "16M")
        let img = medium + "/evidence.qed"
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 0x61 64k 64k", img])
        try Harness.run(["mount", "-o", "remount,ro", medium])
        try s.assertMountRefused([img], mentions: [img, "Read-only file system", "--read-only"], "read-only medium")
        try s.mount(img, options: ["-r"])
        XCTAssertTrue(try Files.read(s.mnt + "/evidence.raw") == (try s.qemuRaw(img)))
        try s.unmount()
    }

    func testSigtermFlushesAndUnmounts() throws {
        let s = try Scratch()
        let img = s.path("t.img")
        try Harness.run(["truncate", "-s", "8M", img])
        try s.mount(img)
        let payload = [UInt8](repeating: 0xC3, count: 1 << 20)
        try Files.pwrite(s.mnt + "/t.raw", payload, at: 3 << 20)
        let pidText = try String(contentsOfFile: "/run/rawmount/" + s.mnt.replacingOccurrences(of: "%", with: "%25")
                                    .replacingOccurrences(of: "/", with: "%2F") + ".pid", encoding: .utf8)
        let pid = pid_t(pidText.trimmingCharacters(in: .whitespacesAndNewlines))!
        XCTAssertEqual(kill(pid, SIGTERM), 0)
        var waited = 0
        while kill(pid, 0) == 0 && waited < 500 {
            let st = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            if st.contains(") Z") { break }
            usleep(10_000); waited += 1
        }
        XCTAssertLessThan(waited, 500, "server did not exit on SIGTERM")
        XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0, "still mounted")
        let data = try Files.read(img)
        XCTAssertEqual(Array(data[(3 << 20)..<(4 << 20)]), payload)
    }

    func testReadOnlyMountRefusesWritesAndLeavesImageUntouched() throws {
        let s = try Scratch()
        let img = s.path("ro.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: img, contents: Data((0..<(2 << 20)).map { UInt8(truncatingIfNeeded: $0 / 3) })))
        try Harness.run(["touch", "-d", "2020-01-02 03:04:05", img])
        let before = try Files.sha(img)
        let mtime = try Harness.run(["stat", "-c", "%Y", img]).out
        try s.mount(img, options: ["--read-only"])
        let raw = s.mnt + "/ro.raw"
        let fd = open(raw, O_RDWR)
        XCTAssertEqual(fd, -1)
        XCTAssertEqual(errno, EROFS)
        XCTAssertEqual(try Files.read(raw), try Files.read(img))
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), before)
        XCTAssertEqual(try Harness.run(["stat", "-c", "%Y", img]).out, mtime)
        // The FUSE option `-o ro` means the same: the image is not opened for writing, so a
        // reader that excludes writers (qemu-img info) still gets in.
        try s.mount(img, options: ["-o", "ro"])
        XCTAssertEqual(open(raw, O_RDWR), -1)
        XCTAssertEqual(errno, EROFS)
        try Harness.run(["qemu-img", "info", img])
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), before)
    }

    func testFileMountpointBecomesTheRawView() throws {
        let s = try Scratch()
        let img = s.path("img.bin"), target = s.path("view.raw")
        XCTAssertTrue(FileManager.default.createFile(atPath: img, contents: Data(repeating: 0x42, count: 1 << 20)))
        XCTAssertTrue(FileManager.default.createFile(atPath: target, contents: Data()))
        try s.mount(img, at: target)
        XCTAssertEqual(try Files.read(target), Data(repeating: 0x42, count: 1 << 20))
        try s.unmount(target)
        XCTAssertEqual(try Files.read(target).count, 0, "the placeholder file is back")
    }

    func testBadInputGivesClearErrorAndMountsNothing() throws {
        let s = try Scratch()
        try s.assertMountRefused([s.path("nope.qed")], status: nil, mentions: ["nope.qed: cannot open the image: No such file"],
                                 "missing image")

        let img = s.path("ok.img")
        try Harness.run(["truncate", "-s", "1M", img])
        let badMp = try Harness.run([Harness.rawmount, "mount", img, s.path("no-such-dir")], check: false)
        XCTAssertNotEqual(badMp.status, 0)
        XCTAssertTrue(badMp.err.contains("mountpoint \(s.path("no-such-dir")): No such file") && badMp.err.contains("mkdir"), badMp.err)

        try s.assertMountRefused(["--format", "floppy", img], status: nil, mentions: ["floppy"], "unknown format")
    }

    /// Images QEMU reads and rawmount does not are refused, naming their format, instead of
    /// being probed as raw (which would show container bytes and take corrupting writes);
    /// also as a QED backing file. --format raw still shows the bytes, as asked.
    func testFormatsRawmountDoesNotReadAreNamedNotShownAsRaw() throws {
        try Harness.tool("qemu-img")
        let s = try Scratch()
        for (format, name) in [("qcow", "qcow (version 1)"), ("parallels", "Parallels")] {
            let img = s.path("foreign.\(format)")
            try Harness.run(["qemu-img", "create", "-q", "-f", format, img, "8M"])
            try s.assertMountRefused([img], mentions: [img, "this is a \(name)"], format)
            let info = try Harness.run([Harness.rawmount, "info", img], check: false)
            XCTAssertNotEqual(info.status, 0, "\(format): info called it \(info.out)")
        }
        let qcow = s.path("foreign.qcow")
        let child = s.path("child.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-b", "foreign.parallels", "-F", "parallels", child, "8M"])
        try s.assertMountRefused(["-r", child], mentions: ["Parallels"], "Parallels backing file")
        try s.mount(qcow, options: ["-r", "--format", "raw"])
        XCTAssertEqual(try Files.sha(s.mnt + "/foreign.raw"), try Files.sha(qcow))
        try s.unmount()
    }

    /// As in QEMU: through a raw image whose format was probed, a write that would make its
    /// first sector another format's header is refused (EPERM), small or large (large writes
    /// are refused before they are acknowledged); other writes there pass. --format raw
    /// allows it.
    func testProbedRawRefusesAnotherFormatsHeaderInSectorZero() throws {
        let s = try Scratch()
        let img = s.path("plain.img"), qed = s.path("h.qed")
        try Harness.run(["truncate", "-s", "8M", img])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-b", "/etc/shadow", "-F", "raw", qed, "8M"])
        let header = [UInt8](try Files.read(qed).prefix(4096))
        try s.mount(img)
        let raw = s.mnt + "/plain.raw"
        for size in [512, 1 << 20] {
            var chunk = header + [UInt8](repeating: 0, count: max(0, size - header.count))
            chunk = Array(chunk.prefix(size))
            XCTAssertThrowsError(try Files.pwrite(raw, chunk, at: 0), "a \(size)-byte QED header write went through") { e in
                XCTAssertEqual((e as? POSIXError)?.code, .EPERM, "\(e)")
            }
        }
        var rng = SeededRandom(seed: 5)
        let mbr = rng.bytes(446) + [UInt8](repeating: 0, count: 64) + [0x55, 0xAA]
        try Files.pwrite(raw, mbr, at: 0)
        try s.unmount()
        XCTAssertTrue(try Harness.run([Harness.rawmount, "info", img]).out.contains("format: raw"))
        XCTAssertEqual([UInt8](try Files.read(img).prefix(512)), mbr)
        try s.mount(img, options: ["--format", "raw"])
        try Files.pwrite(raw, Array(header.prefix(512)), at: 0)
        try s.unmount()
        let info = try Harness.run([Harness.rawmount, "info", img], check: false)
        XCTAssertTrue(info.out.contains("format: qed"), "asked for with --format raw, the header was written: \(info.out)\(info.err)")
    }

    func testSecondWriterIsRefusedByImageLocks() throws {
        try Harness.tool("qemu-img")
        let s = try Scratch()
        let img = s.path("locked.img")
        try Harness.run(["truncate", "-s", "1M", img])
        try s.mount(img)
        let mnt2 = s.path("mnt2")
        try FileManager.default.createDirectory(atPath: mnt2, withIntermediateDirectories: true)
        let second = try Harness.run([Harness.rawmount, "mount", img, mnt2], check: false)
        XCTAssertNotEqual(second.status, 0)
        XCTAssertTrue(second.err.contains("locked.img") && second.err.contains("in use"), second.err)
        // QEMU sees our lock too (its locking bytes), and we see QEMU's.
        let q = try Harness.run(["qemu-io", "-f", "raw", "-c", "write 0 512", img], check: false)
        XCTAssertNotEqual(q.status, 0, "qemu-io wrote to an image rawmount has open for writing")
        try s.unmount()
        try Harness.run(["qemu-io", "-f", "raw", "-c", "write 0 512", img])
    }

    func testInfoJson() throws {
        let s = try Scratch()
        let img = s.path("i.img")
        try Harness.run(["truncate", "-s", "3M", img])
        let r = try Harness.run([Harness.rawmount, "info", "--json", img])
        let obj = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any]
        XCTAssertEqual(obj?["format"] as? String, "raw")
        XCTAssertEqual((obj?["virtual-size"] as? NSNumber)?.intValue, 3 << 20)
    }

    /// ro and rw in -o lists: the last wins, as mount(8) reads them; -r with -o rw is refused.
    func testReadOnlyOptionsLastWins() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("rw.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        for (opts, readOnly) in [(["-o", "ro,rw"], false), (["-o", "rw,ro"], true), (["-o", "ro", "-o", "rw"], false)] {
            try s.mount(img, options: opts)
            let row = try Harness.run([Harness.rawmount, "list"]).out.split(separator: "\n").first { $0.contains("rw.qcow2") } ?? ""
            XCTAssertTrue(row.contains(readOnly ? "\tro\t" : "\trw\t"), "\(opts): \(row)")
            try s.unmount()
        }
        let r = try Harness.run([Harness.rawmount, "mount", "-r", "-o", "rw", img, s.mnt], check: false)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.err.contains("contradicts"), r.err)
        // Names list and unmount rely on are rawmount's own.
        for o in ["fsname=other", "subtype=x"] {
            let r = try Harness.run([Harness.rawmount, "mount", "-r", "-o", o, img, s.mnt], check: false)
            XCTAssertNotEqual(r.status, 0, o)
            XCTAssertTrue(r.err.contains("sets it itself"), r.err)
            XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0, "\(o): mounted")
        }
    }

    /// `-o max_read=N` (which libfuse checks against the connection at INIT, after the mount
    /// was made) mounts and serves: the mount is still there and reads equal the image.
    func testMaxReadOptionMountsAndReads() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("mr.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 1M 2M", img])
        let oracle = try s.qemuRaw(img)
        try s.mount(img, options: ["-r", "-o", "max_read=65536"])
        XCTAssertEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0, "the mount went away after INIT")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: s.mnt + "/mr.raw")), oracle)
        XCTAssertTrue(try Harness.run([Harness.rawmount, "list"]).out.contains("mr.qcow2"))
        try s.unmount()
    }

    /// As qemu-storage-daemon allows: an image shown read-only over its own file (the file
    /// reads as the guest disk until the unmount, then is the image again); a writable mount
    /// over itself is refused.
    func testImageShownReadOnlyOverItsOwnFile() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("self.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", img])
        let oracle = try s.qemuRaw(img)
        let sha = try Files.sha(img)
        let w = try Harness.run([Harness.rawmount, "mount", img, img], check: false)
        XCTAssertEqual(w.status, 1)
        XCTAssertTrue(w.err.contains("only read-only"), w.err)
        try s.mount(img, at: img, options: ["-r"])
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: img)), oracle)
        try s.unmount(img)
        XCTAssertEqual(try Files.sha(img), sha)
        try Harness.run(["qemu-img", "check", img])
    }
}
