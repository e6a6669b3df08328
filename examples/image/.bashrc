# .bashrc of the local cluster's image (stands in for the dev instance's AMI).
export PATH="$HOME/.local/bin:$PATH"
