/// The examples each verb's help (and the man page made from it) ends with.
enum Examples {
    static let byVerb: [String: [String]] = [
        "mount": ["rawmount mount disk.vmdk /mnt/x          # /mnt/x/disk.raw, and disk-p1.raw ... for its partitions",
                  "rawmount mount -r evidence.E01.qcow2 /mnt/e   # read-only",
                  "rawmount mount --overlay work.qcow2 seized.vhdx /mnt/case   # writes go to work.qcow2 only",
                  "rawmount mount disk.qcow2 ./disk.raw      # an existing file becomes the raw view"],
        "unmount": ["rawmount unmount /mnt/x"],
        "list": ["rawmount list", "rawmount list --json"],
        "info": ["rawmount info disk.vhdx", "rawmount info --json --backing-chain top.qcow2"],
        "create": ["rawmount create -f qcow2 disk.qcow2 20G", "rawmount create -f vhdx -o subformat=fixed,block_size=32M disk.vhdx 10G",
                   "rawmount create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"],
        "check": ["rawmount check disk.qcow2", "rawmount check --repair disk.vhd", "rawmount check --output=json disk.qed"],
        "bitmap": ["rawmount bitmap list disk.qcow2", "rawmount bitmap add disk.qcow2 daily", "rawmount bitmap dump --json disk.qcow2 daily"],
        "hash": ["rawmount hash disk.vmdk", "rawmount hash --algorithm md5 --algorithm sha1 evidence.vhd",
                 "rawmount hash --verify 3f2a... disk.qcow2", "rawmount hash --verify evidence.E01   # against the digest it stores"],
        "backup": ["rawmount backup disk.qcow2 /backups     # full the first time, then incremental",
                   "rawmount backup --dry-run --json disk.qcow2 /backups", "rawmount backup --restore /backups/disk.inc.20261206T142000.123Z.qcow2 restored.raw",
                   "rawmount backup --verify /backups"],
        "compare": ["rawmount compare disk.vmdk disk.qcow2", "rawmount compare -s -f qcow2 -F raw disk.qcow2 disk.img"],
        "rebase": ["rawmount rebase -b new-base.qcow2 -F qcow2 top.qcow2", "rawmount rebase -u -b moved/base.qcow2 top.qcow2",
                   "rawmount rebase -b \"\" top.qcow2   # no backing file: the image becomes whole"],
        "commit": ["rawmount commit top.qcow2            # into its backing file, then top.qcow2 is emptied", "rawmount commit -d -b base.qcow2 top.qcow2"],
        "resize": ["rawmount resize disk.qcow2 +10G", "rawmount resize --shrink disk.img 8G"],
        "snapshot": ["rawmount snapshot -l disk.qcow2", "rawmount snapshot -c before-upgrade disk.qcow2",
                     "rawmount snapshot -a before-upgrade disk.qcow2   # the disk as it was", "rawmount snapshot -d before-upgrade disk.qcow2"],
        "measure": ["rawmount measure -O qcow2 disk.vmdk", "rawmount measure --output=json -O qcow2 -o cluster_size=2M --size 100G"],
        "verify": ["rawmount verify evidence.E01", "rawmount verify --json case/disk.s01"],
        "map": ["rawmount map disk.qcow2", "rawmount map --output=json disk.vhdx"],
        "convert": ["rawmount convert -O qcow2 disk.vmdk disk.qcow2", "rawmount convert -p -O vpc -o subformat=fixed disk.qcow2 disk.vhd"],
        "serve": ["rawmount serve --unix /run/disk.sock disk.qcow2   # then: qemu-img info nbd+unix:///?socket=/run/disk.sock"],
    ]

    /// "Examples:" and the verb's lines, for a discussion.
    static func section(_ verb: String) -> String {
        "\n\nExamples:\n" + (byVerb[verb] ?? []).map { "  " + $0 }.joined(separator: "\n")
    }

    /// The overview's closing: an fstab line, a forensic session, where to read more.
    static let overview = """


        Examples:
          rawmount disk.vmdk /mnt/x            # the default verb is mount
          # an /etc/fstab line:
          /srv/disk.qcow2 /mnt/disk fuse.rawmount ro,allow_other,nofail 0 0
          # a forensic look: writes to an overlay, the evidence untouched
          rawmount mount --overlay notes.qcow2 seized.vhd /mnt/case
          fls -r /mnt/case/seized-p1.raw

        See also: qemu-img(1), qemu-storage-daemon(1), nbdkit(1), fusermount3(1), mount.fuse3(8).
        """
}
