#!/usr/bin/env bash
# Prints where Linux guests can run on KVM here: "direct" (hardware VT-x/AMD-V) or "lab".
# REAPVM_KVM_PLACE=lab|direct overrides the choice.
case "${REAPVM_KVM_PLACE:-}" in lab|direct) echo "$REAPVM_KVM_PLACE"; exit 0 ;; esac
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -e /dev/kvm ]; then echo direct; else echo lab; fi
